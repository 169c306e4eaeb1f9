// Models: the base models registered on the server and the organisation's fine-tuned ones,
// with their architecture (GET /v1/models/{id}), the job that made each and the jobs that
// used it.

import { get, type Job, type ListPage, type Model } from "../api";
import { count, dateTime } from "../format";
import { Link } from "../router";
import { ErrorBox, ProgressBar, Section, StatusBadge, usePoll } from "../ui";

function modelHref(id: string): string {
  return `/models/${encodeURIComponent(id)}`;
}

export function ModelsPage() {
  const models = usePoll(() => get<ListPage<Model>>("/v1/models"), []);
  const rows = models.value?.data ?? [];
  return (
    <>
      <div class="page-head">
        <h1>Models</h1>
      </div>
      <ErrorBox error={models.error} />
      <div class="table-wrap">
        <table class="models">
          <thead>
            <tr>
              <th scope="col">Model</th>
              <th scope="col">Kind</th>
              <th scope="col">Family</th>
              <th scope="col">Layers</th>
              <th scope="col">Heads</th>
              <th scope="col">KV heads</th>
              <th scope="col">Hidden</th>
              <th scope="col">Parameters</th>
              <th scope="col">Tasks</th>
              <th scope="col">Added</th>
            </tr>
          </thead>
          <tbody>
            {rows.map((m) => {
              const a = m.architecture;
              return (
                <tr data-model={m.id}>
                  <td>
                    <Link href={modelHref(m.id)} class="mono">
                      {m.id}
                    </Link>
                  </td>
                  <td>{m.kind === "base" ? "base" : "fine-tuned"}</td>
                  <td>{a.family ?? a.model_type ?? "—"}</td>
                  <td>{a.num_layers ?? "—"}</td>
                  <td>{a.num_heads ?? "—"}</td>
                  <td>{a.num_kv_heads ?? "—"}</td>
                  <td>{a.hidden_size ?? "—"}</td>
                  <td>{count(a.num_parameters)}</td>
                  <td>{(a.tasks ?? []).join(", ") || "—"}</td>
                  <td class="nowrap">{dateTime(m.created)}</td>
                </tr>
              );
            })}
          </tbody>
        </table>
        {models.value && rows.length === 0 && (
          <p class="empty">
            No models yet: register one with <code>tuna models register NAME DIR</code>.
          </p>
        )}
      </div>
    </>
  );
}

const FACTS: [string, string][] = [
  ["family", "Family"],
  ["model_type", "model_type"],
  ["architectures", "Class"],
  ["num_layers", "Layers"],
  ["num_heads", "Attention heads"],
  ["num_kv_heads", "KV heads"],
  ["hidden_size", "Hidden size"],
  ["context_length", "Context length"],
  ["vocab_size", "Vocabulary"],
  ["num_parameters", "Parameters"],
  ["dtype", "dtype"],
  ["tasks", "Tasks"],
];

export function ModelPage(props: { id: string }) {
  const model = usePoll(() => get<Model>(`/v1/models/${encodeURIComponent(props.id)}`), [props.id]);
  const used = usePoll(() => get<ListPage<Job>>("/v1/fine_tuning/jobs", { model: props.id, limit: 20 }), [props.id]);
  const m = model.value;
  if (!m) return model.error ? <ErrorBox error={model.error} /> : <p class="muted">Loading {props.id}…</p>;
  const a = m.architecture;
  const shown = (k: string) => {
    const v = a[k];
    if (v === null || v === undefined) return "—";
    if (k === "num_parameters") return `${count(v as number)} (${(v as number).toLocaleString("en")})`;
    return Array.isArray(v) ? v.join(", ") : String(v);
  };
  return (
    <>
      <div class="page-head">
        <div>
          <p class="muted small">
            <Link href="/models">Models</Link> /
          </p>
          <h1 class="mono">{m.id}</h1>
          <p class="subtitle">
            {m.kind === "base" ? "base model" : "fine-tuned model"} · owned by {m.owned_by} · added {dateTime(m.created)}
            {m.job_id && (
              <>
                {" "}
                · made by{" "}
                <Link href={`/jobs/${encodeURIComponent(m.job_id)}`} class="mono">
                  {m.job_id}
                </Link>
              </>
            )}
          </p>
        </div>
        <Link href={`/new`} class="button">
          New job
        </Link>
      </div>
      <div class="grid-2">
        <Section title="Architecture">
          <table class="kv" data-testid="architecture">
            <tbody>
              {FACTS.map(([k, label]) => (
                <tr>
                  <th scope="row">{label}</th>
                  <td data-key={k}>{shown(k)}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </Section>
        <div>
          <Section title="LoRA target modules">
            <ul class="tags" data-testid="lora-modules">
              {(a.lora_target_modules ?? []).map((x) => (
                <li>
                  <code>{x}</code>
                </li>
              ))}
            </ul>
          </Section>
          <Section title="Freezable parameter groups">
            <ul class="tags" data-testid="freeze-patterns">
              {(a.freeze_patterns ?? []).map((x) => (
                <li>
                  <code>{x}</code>
                </li>
              ))}
            </ul>
          </Section>
        </div>
      </div>
      <Section
        title="Jobs that used this model"
        actions={
          <Link href={`/jobs?model=${encodeURIComponent(m.id)}`} class="small">
            all
          </Link>
        }
      >
        <ErrorBox error={used.error} />
        {used.value && used.value.data.length === 0 && <p class="muted">No job has used this model yet.</p>}
        {used.value && used.value.data.length > 0 && (
          <div class="table-wrap">
            <table data-testid="model-jobs">
              <thead>
                <tr>
                  <th scope="col">Job</th>
                  <th scope="col">Status</th>
                  <th scope="col">Progress</th>
                  <th scope="col">Fine-tuned model</th>
                  <th scope="col">Created</th>
                </tr>
              </thead>
              <tbody>
                {used.value.data.map((j) => (
                  <tr data-job={j.id}>
                    <td>
                      <Link href={`/jobs/${encodeURIComponent(j.id)}`} class="mono">
                        {j.id}
                      </Link>
                    </td>
                    <td>
                      <StatusBadge status={j.status} />
                    </td>
                    <td>
                      <ProgressBar job={j} />
                    </td>
                    <td class="mono">{j.fine_tuned_model ? <Link href={modelHref(j.fine_tuned_model)}>{j.fine_tuned_model}</Link> : "—"}</td>
                    <td class="nowrap">{dateTime(j.created_at)}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
        )}
      </Section>
    </>
  );
}
