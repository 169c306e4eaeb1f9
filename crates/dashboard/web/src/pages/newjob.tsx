// New job: the data (uploaded here, checked line by line before any job exists, or one
// uploaded before), the model and task, the method (full, freeze, LoRA) and its knobs with the
// defaults the server applies when a field is left empty (docs/job-spec.md), then create and
// go to the job's page.

import { useMemo, useState } from "preact/hooks";
import { ApiError, get, listAll, post, uploadFile, type FileObject, type Job, type ListPage, type Model } from "../api";
import { count, lineErrors } from "../format";
import { navigate } from "../router";
import { ErrorBox, Section, usePoll } from "../ui";

type Method = "full" | "freeze" | "lora";

interface Knob {
  name: string;
  label: string;
  /** What the server uses when the field is empty. */
  dflt: (ctx: Ctx) => string;
  kind: "int" | "number" | "choice" | "bool";
  choices?: string[];
  help?: string;
  methods?: Method[];
  advanced?: boolean;
}

interface Ctx {
  method: Method;
  task: string;
  model: Model | undefined;
  lora_r: string;
}

/** The server's defaults (crates/core/src/spec/request.rs, docs/job-spec.md). */
function learningRate(c: Ctx): string {
  if (c.method === "lora") return "0.0002";
  return c.task !== "causal_lm" ? "0.00005" : "0.00002";
}

function seqLength(c: Ctx): string {
  const d = c.task !== "causal_lm" ? 128 : 1024;
  const ctx = c.model?.architecture.context_length;
  return String(ctx && ctx > 0 ? Math.min(d, ctx) : d);
}

const KNOBS: Knob[] = [
  { name: "n_epochs", label: "Epochs", dflt: () => "3", kind: "int", help: "passes over the training data" },
  { name: "batch_size", label: "Batch size", dflt: () => "8", kind: "int", help: "examples per micro-batch" },
  { name: "learning_rate", label: "Learning rate", dflt: learningRate, kind: "number", help: "peak, after warm-up" },
  { name: "max_seq_length", label: "Max sequence length", dflt: seqLength, kind: "int", help: "longer examples are truncated" },
  { name: "max_steps", label: "Max steps", dflt: () => "0", kind: "int", help: "0: every epoch" },
  { name: "lora_r", label: "LoRA rank", dflt: () => "16", kind: "int", methods: ["lora"] },
  { name: "lora_alpha", label: "LoRA alpha", dflt: (c) => String(2 * (parseInt(c.lora_r) || 16)), kind: "number", methods: ["lora"], help: "2 × rank" },
  { name: "lora_dropout", label: "LoRA dropout", dflt: () => "0.05", kind: "number", methods: ["lora"] },
  { name: "quantization", label: "Base weights", dflt: () => "none", kind: "choice", choices: ["none", "nf4"], methods: ["lora"], help: "nf4: QLoRA, the frozen base in 4 bits" },
  { name: "merge_lora", label: "Also export merged weights", dflt: () => "false", kind: "bool", methods: ["lora"] },
  { name: "freeze_embeddings", label: "Freeze embeddings", dflt: () => "false", kind: "bool", methods: ["freeze"] },
  { name: "freeze_layers", label: "Freeze the first N layers", dflt: () => "0", kind: "int", methods: ["freeze"] },
  { name: "lr_scheduler", label: "LR schedule", dflt: () => "linear", kind: "choice", choices: ["constant", "linear", "cosine"], advanced: true },
  { name: "warmup_ratio", label: "Warm-up ratio", dflt: () => "0", kind: "number", advanced: true },
  { name: "weight_decay", label: "Weight decay", dflt: () => "0", kind: "number", advanced: true },
  { name: "optimizer_moments", label: "Optimizer moments", dflt: () => "fp32", kind: "choice", choices: ["fp32", "bf16"], advanced: true, help: "bf16: half the optimizer state, stochastic rounding" },
  { name: "gradient_accumulation_steps", label: "Gradient accumulation", dflt: () => "1", kind: "int", advanced: true },
  { name: "validation_split", label: "Validation split", dflt: () => "0.1", kind: "number", advanced: true, help: "held out when no validation file" },
  { name: "eval_interval", label: "Eval every N steps", dflt: () => "0", kind: "int", advanced: true, help: "0: each epoch" },
  { name: "checkpoint_interval", label: "Checkpoint every N steps", dflt: () => "0", kind: "int", advanced: true, help: "0: each epoch" },
  { name: "log_interval", label: "Log every N steps", dflt: () => "10", kind: "int", advanced: true },
  { name: "packing", label: "Packing", dflt: () => "false", kind: "bool", advanced: true },
];

export function NewJobPage() {
  const models = usePoll(() => get<ListPage<Model>>("/v1/models"), []);
  const [training, setTraining] = useState<FileObject | null>(null);
  const [validation, setValidation] = useState<FileObject | null>(null);
  const [modelId, setModelId] = useState("");
  const [task, setTask] = useState("");
  const [method, setMethod] = useState<Method>("lora");
  const [values, setValues] = useState<Record<string, string>>({});
  const [targets, setTargets] = useState<string[]>([]);
  const [patterns, setPatterns] = useState<string[]>([]);
  const [suffix, setSuffix] = useState("");
  const [error, setError] = useState<ApiError | null>(null);
  const [busy, setBusy] = useState(false);

  const model = models.value?.data.find((m) => m.id === modelId);
  const tasks = model?.architecture.tasks ?? ["causal_lm", "sequence_classification", "sequence_regression", "multi_label_classification", "token_classification", "question_answering"];
  const effectiveTask = tasks.includes(task) ? task : tasks[0];
  const ctx: Ctx = { method, task: effectiveTask, model, lora_r: values.lora_r ?? "" };
  const shown = KNOBS.filter((k) => !k.methods || k.methods.includes(method));

  const submit = async (e: Event) => {
    e.preventDefault();
    setError(null);
    if (!training) {
      setError(new ApiError(0, "Upload or choose a training file first.", "training_file"));
      return;
    }
    if (!modelId) {
      setError(new ApiError(0, "Choose a model.", "model"));
      return;
    }
    const hp: Record<string, unknown> = { task: effectiveTask, training_type: method === "lora" ? "lora" : "full" };
    for (const k of shown) {
      const v = (values[k.name] ?? "").trim();
      if (!v) continue;
      hp[k.name] = k.kind === "int" || k.kind === "number" ? Number(v) : k.kind === "bool" ? v === "true" : v;
    }
    if (method === "lora" && targets.length) hp.lora_target_modules = targets;
    if (method === "freeze" && patterns.length) hp.freeze_patterns = patterns;
    const body: Record<string, unknown> = {
      model: modelId,
      training_file: training.id,
      method: { type: "supervised", supervised: { hyperparameters: hp } },
    };
    if (validation) body.validation_file = validation.id;
    if (suffix.trim()) body.suffix = suffix.trim();
    setBusy(true);
    try {
      const job = await post<Job>("/v1/fine_tuning/jobs", body);
      navigate(`/jobs/${encodeURIComponent(job.id)}`);
    } catch (err) {
      setError(err as ApiError);
    } finally {
      setBusy(false);
    }
  };

  const invalid = (name: string) => (error?.param && (error.param === name || error.param.endsWith(`.${name}`)) ? "true" : undefined);

  return (
    <>
      <div class="page-head">
        <h1>New job</h1>
      </div>
      <form class="newjob" onSubmit={submit} noValidate>
        <Section title="1. Data">
          <FileField id="training-file" label="Training file" file={training} onFile={setTraining} required />
          <FileField id="validation-file" label="Validation file (optional)" file={validation} onFile={setValidation} />
        </Section>
        <Section title="2. Model and task">
          <div class="fields">
            <label>
              Model
              <select name="model" value={modelId} onChange={(e) => setModelId((e.target as HTMLSelectElement).value)} aria-invalid={invalid("model")} required>
                <option value="">choose…</option>
                {(models.value?.data ?? []).map((m) => (
                  <option value={m.id}>
                    {m.id} ({m.kind === "base" ? m.architecture.family ?? "base" : "fine-tuned"}, {count(m.architecture.num_parameters)} parameters)
                  </option>
                ))}
              </select>
            </label>
            <label>
              Task
              <select name="task" value={effectiveTask} onChange={(e) => setTask((e.target as HTMLSelectElement).value)} aria-invalid={invalid("task")}>
                {tasks.map((t) => (
                  <option value={t}>{t}</option>
                ))}
              </select>
            </label>
            <label>
              Suffix (optional)
              <input name="suffix" value={suffix} maxLength={64} onInput={(e) => setSuffix((e.target as HTMLInputElement).value)} aria-invalid={invalid("suffix")} />
            </label>
          </div>
        </Section>
        <Section title="3. Method">
          <fieldset class="methods">
            <legend class="sr-only">Method</legend>
            {(
              [
                ["full", "Full", "every weight trains"],
                ["freeze", "Freeze", "full fine-tuning with some weights kept fixed"],
                ["lora", "LoRA", "small adapters train; the base stays fixed"],
              ] as [Method, string, string][]
            ).map(([v, label, help]) => (
              <label class="method">
                <input type="radio" name="method" value={v} checked={method === v} onChange={() => setMethod(v)} /> <strong>{label}</strong>{" "}
                <span class="muted small">{help}</span>
              </label>
            ))}
          </fieldset>
          <p class="muted small">Empty fields take the default shown; the job page lists every value as resolved.</p>
          <div class="fields knobs">
            {shown
              .filter((k) => !k.advanced)
              .map((k) => (
                <KnobField knob={k} ctx={ctx} value={values[k.name] ?? ""} onValue={(v) => setValues({ ...values, [k.name]: v })} invalid={invalid(k.name)} />
              ))}
          </div>
          {method === "lora" && model && (
            <Choices
              label="LoRA target modules"
              help="none ticked: all-linear (every linear layer)"
              options={(model.architecture.lora_target_modules ?? []).filter((m) => m !== "all-linear")}
              chosen={targets}
              onChange={setTargets}
            />
          )}
          {method === "freeze" && model && (
            <Choices label="Freeze parameter groups" help="glob patterns over parameter names" options={model.architecture.freeze_patterns ?? []} chosen={patterns} onChange={setPatterns} />
          )}
          <details>
            <summary>Advanced</summary>
            <div class="fields knobs">
              {shown
                .filter((k) => k.advanced)
                .map((k) => (
                  <KnobField knob={k} ctx={ctx} value={values[k.name] ?? ""} onValue={(v) => setValues({ ...values, [k.name]: v })} invalid={invalid(k.name)} />
                ))}
            </div>
          </details>
        </Section>
        {error && (
          <p class="error" role="alert">
            {error.message}
            {error.param && <span class="small"> (field {error.param})</span>}
          </p>
        )}
        <div class="form-actions">
          <button type="submit" disabled={busy}>
            {busy ? "Creating…" : "Create job"}
          </button>
        </div>
      </form>
    </>
  );
}

function KnobField(props: { knob: Knob; ctx: Ctx; value: string; onValue: (v: string) => void; invalid?: "true" }) {
  const k = props.knob;
  const d = k.dflt(props.ctx);
  const id = `knob-${k.name}`;
  const hint = `default ${d}${k.help ? ` · ${k.help}` : ""}`;
  let input;
  if (k.kind === "bool" || k.kind === "choice") {
    const choices = k.kind === "bool" ? ["true", "false"] : k.choices!;
    input = (
      <select id={id} name={k.name} value={props.value} onChange={(e) => props.onValue((e.target as HTMLSelectElement).value)} aria-invalid={props.invalid} aria-describedby={`${id}-hint`}>
        <option value="">default ({d})</option>
        {choices.map((c) => (
          <option value={c}>{c}</option>
        ))}
      </select>
    );
  } else {
    input = (
      <input
        id={id}
        name={k.name}
        inputMode={k.kind === "int" ? "numeric" : "decimal"}
        placeholder={d}
        value={props.value}
        onInput={(e) => props.onValue((e.target as HTMLInputElement).value)}
        aria-invalid={props.invalid}
        aria-describedby={`${id}-hint`}
      />
    );
  }
  return (
    <div class="field" data-knob={k.name} data-default={d}>
      <label for={id}>
        {k.label} <code class="small">{k.name}</code>
      </label>
      {input}
      <span id={`${id}-hint`} class="hint">
        {hint}
      </span>
    </div>
  );
}

function Choices(props: { label: string; help: string; options: string[]; chosen: string[]; onChange: (v: string[]) => void }) {
  return (
    <fieldset class="choices">
      <legend>
        {props.label} <span class="muted small">{props.help}</span>
      </legend>
      {props.options.map((o) => (
        <label>
          <input
            type="checkbox"
            value={o}
            checked={props.chosen.includes(o)}
            onChange={() => props.onChange(props.chosen.includes(o) ? props.chosen.filter((x) => x !== o) : [...props.chosen, o])}
          />{" "}
          <code>{o}</code>
        </label>
      ))}
    </fieldset>
  );
}

function FileField(props: { id: string; label: string; file: FileObject | null; onFile: (f: FileObject | null) => void; required?: boolean }) {
  const [error, setError] = useState<ApiError | null>(null);
  const [busy, setBusy] = useState(false);
  const uploaded = usePoll(() => listAll<FileObject>("/v1/files", { purpose: "fine-tune" }, 200), [props.file?.id]);
  const usable = useMemo(() => (uploaded.value ?? []).filter((f) => f.status === "processed"), [uploaded.value]);
  const lines = error ? lineErrors(error.message) : [];
  return (
    <div class="file-field">
      <label for={props.id}>{props.label}</label>
      <div class="file-row">
        <input
          id={props.id}
          type="file"
          accept=".jsonl,.json,.csv,.tsv,.txt,.conll,.iob,.iob2,.bio"
          disabled={busy}
          aria-describedby={`${props.id}-status`}
          onChange={async (e) => {
            const input = e.target as HTMLInputElement;
            const f = input.files?.[0];
            if (!f) return;
            setBusy(true);
            setError(null);
            props.onFile(null);
            try {
              props.onFile(await uploadFile(f));
            } catch (err) {
              setError(err as ApiError);
              input.value = "";
            } finally {
              setBusy(false);
            }
          }}
        />
        <span class="muted small">or</span>
        <select
          aria-label={`${props.label}: an uploaded file`}
          value={props.file?.id ?? ""}
          onChange={(e) => {
            setError(null);
            props.onFile(usable.find((f) => f.id === (e.target as HTMLSelectElement).value) ?? null);
          }}
        >
          <option value="">{props.required ? "choose an uploaded file…" : "none"}</option>
          {usable.map((f) => (
            <option value={f.id}>
              {f.filename} ({f.id}, {f.example_count ?? "?"} examples)
            </option>
          ))}
          {props.file && !usable.some((f) => f.id === props.file!.id) && <option value={props.file.id}>{props.file.filename}</option>}
        </select>
      </div>
      <div id={`${props.id}-status`} aria-live="polite">
        {busy && <p class="muted">Uploading and checking every line…</p>}
        {props.file && (
          <p class="ok">
            ✓ <span class="mono">{props.file.filename}</span>: {props.file.example_count} examples, format {props.file.format} ({props.file.id})
          </p>
        )}
        {error && (
          <div class="error upload-error" role="alert">
            <p>The file was refused; no job was created.</p>
            {lines.length ? (
              <ul>
                {lines.map((l) => (
                  <li>
                    <strong>line {l.line}</strong>: {l.text}
                  </li>
                ))}
              </ul>
            ) : (
              <p>{error.message}</p>
            )}
          </div>
        )}
      </div>
      <ErrorBox error={uploaded.error} />
    </div>
  );
}
