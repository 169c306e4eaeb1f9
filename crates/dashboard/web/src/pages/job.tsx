// A job: live curves from its event stream, the numbers of the latest step, the event log, the
// resolved hyperparameters, checkpoints and the final model with their downloads, the error of
// a failed job, and the controls its state allows.

import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import {
  allowed,
  download,
  followEvents,
  get,
  isTerminal,
  jobPath,
  methodHyperparameters,
  post,
  type ArtifactFile,
  type Checkpoint,
  type Job,
  type JobEvent,
  type ListPage,
} from "../api";
import { Chart, type SeriesSpec } from "../chart";
import { bytes, count, dateTime, duration, lineErrors, num } from "../format";
import { Curves, type Curve } from "../metrics";
import { Link } from "../router";
import { ErrorBox, eta, ProgressBar, Section, StatusBadge, usePoll } from "../ui";

const TRAIN = "#2563eb";
const VALID = "#ea580c";
/** Events kept for the log (the newest). */
const LOG_MAX = 1000;

export function JobPage(props: { id: string }) {
  const id = props.id;
  const job = usePoll(() => get<Job>(jobPath(id)), [id], 2000, (j) => !isTerminal(j.status));
  const [curves, setCurves] = useState(() => new Curves());
  const [version, setVersion] = useState(0);
  const [log, setLog] = useState<JobEvent[]>([]);
  const [live, setLive] = useState<"connecting" | "live" | "reconnecting" | "ended">("connecting");
  const [lastMetrics, setLastMetrics] = useState<Record<string, any> | null>(null);
  const ckptTick = useRef(0);
  const [ckptVersion, setCkptVersion] = useState(0);

  useEffect(() => {
    const c = new Curves();
    setCurves(c);
    setLog([]);
    setLive("connecting");
    // Batches the many events of a replay into one render per frame.
    let pending: JobEvent[] = [];
    let frame = 0;
    const flush = () => {
      frame = 0;
      const batch = pending;
      pending = [];
      let changed = false;
      for (const ev of batch) {
        changed = c.add(ev) || changed;
        if (ev.type === "metrics" && ev.data && typeof ev.data.train_loss === "number") setLastMetrics(ev.data);
        if (/checkpoint/i.test(ev.message)) ckptTick.current++;
      }
      setLog((l) => [...batch.reverse(), ...l].slice(0, LOG_MAX));
      if (changed) setVersion((v) => v + 1);
      setCkptVersion(ckptTick.current);
    };
    const stop = followEvents(id, {
      event(ev) {
        pending.push(ev);
        if (!frame) frame = requestAnimationFrame(flush);
      },
      end() {
        setLive("ended");
        job.reload();
        setCkptVersion((v) => v + 1);
      },
      connection(ok) {
        setLive(ok ? "live" : "reconnecting");
      },
    });
    return () => {
      stop();
      cancelAnimationFrame(frame);
    };
  }, [id]);

  const j = job.value;
  if (!j) {
    return job.error ? <ErrorBox error={job.error} /> : <p class="muted">Loading {id}…</p>;
  }
  return (
    <>
      <JobHeader job={j} onChange={(next) => job.set(next)} />
      <ErrorBox error={job.error} />
      {j.status === "failed" && j.error && <JobFailure job={j} />}
      <Summary job={j} metrics={lastMetrics} live={live} />
      <Curvesection curves={curves} version={version} />
      <div class="grid-2">
        <EventLog events={log} />
        <Hyperparameters job={j} />
      </div>
      <Models job={j} version={ckptVersion} />
    </>
  );
}

function JobHeader(props: { job: Job; onChange: (j: Job) => void }) {
  const j = props.job;
  const can = allowed(j);
  const [busy, setBusy] = useState<string | null>(null);
  const [error, setError] = useState<unknown>(null);
  const act = async (action: "cancel" | "pause" | "resume") => {
    setBusy(action);
    setError(null);
    try {
      props.onChange(await post<Job>(`${jobPath(j.id)}/${action}`));
    } catch (e) {
      setError(e);
    } finally {
      setBusy(null);
    }
  };
  const hp = methodHyperparameters(j) ?? {};
  return (
    <>
      <div class="page-head">
        <div>
          <p class="muted small">
            <Link href="/jobs">Jobs</Link> /
          </p>
          <h1 class="mono">{j.id}</h1>
          <p class="subtitle">
            <StatusBadge status={j.status} /> <span class="mono">{j.model}</span> · {j.task ?? "—"} · {String(hp.training_type ?? "—")}
            {j.fine_tuned_model && (
              <>
                {" "}
                → <Link href={`/models/${encodeURIComponent(j.fine_tuned_model)}`} class="mono">{j.fine_tuned_model}</Link>
              </>
            )}
            {j.cancel_requested && !isTerminal(j.status) && <span class="muted"> · cancelling…</span>}
            {j.pause_requested && j.status === "running" && <span class="muted"> · pausing…</span>}
          </p>
        </div>
        <div class="actions" role="group" aria-label="Job controls">
          <button onClick={() => act("pause")} disabled={!can.pause || busy !== null}>
            {busy === "pause" ? "Pausing…" : "Pause"}
          </button>
          <button onClick={() => act("resume")} disabled={!can.resume || busy !== null}>
            {busy === "resume" ? "Resuming…" : "Resume"}
          </button>
          <button class="danger" onClick={() => confirm(`Cancel ${j.id}?`) && act("cancel")} disabled={!can.cancel || busy !== null}>
            {busy === "cancel" ? "Cancelling…" : "Cancel"}
          </button>
        </div>
      </div>
      <ErrorBox error={error} />
    </>
  );
}

function JobFailure(props: { job: Job }) {
  const e = props.job.error!;
  const lines = lineErrors(e.message);
  return (
    <section class="failure" role="alert" aria-label="Why the job failed">
      <h2>{lines.length ? `Failed: bad data at line ${lines.map((l) => l.line).join(", ")}` : "Failed"}</h2>
      <p class="mono">{e.message}</p>
      {lines.length > 0 && (
        <ul class="bad-lines">
          {lines.map((l) => (
            <li>
              <strong>line {l.line}</strong>: {l.text}
            </li>
          ))}
        </ul>
      )}
      <p class="small muted">
        code <code>{e.code}</code>
        {e.param && (
          <>
            {" "}
            · field <code>{e.param}</code>
          </>
        )}
      </p>
    </section>
  );
}

function Summary(props: { job: Job; metrics: Record<string, any> | null; live: string }) {
  const j = props.job;
  const m = props.metrics;
  const p = j.progress;
  const items: [string, string][] = [
    ["Step", p?.total_steps ? `${p.step ?? 0} / ${p.total_steps}` : "—"],
    ["ETA", eta(j)],
    ["Epoch", num(p?.epoch ?? m?.epoch, 2)],
    ["Train loss", num(m?.train_loss ?? p?.train_loss)],
    ["Learning rate", num(m?.learning_rate)],
    ["Tokens/s", m?.tokens_per_second ? Math.round(m.tokens_per_second).toString() : "—"],
    ["Trained tokens", count(j.trained_tokens ?? m?.trained_tokens)],
    ["Peak memory", typeof m?.peak_memory_bytes === "number" ? bytes(m.peak_memory_bytes) : "—"],
    [
      "Planned memory",
      j.memory_estimate
        ? `${bytes(j.memory_estimate.cpu.total_bytes)} CPU · ${bytes(j.memory_estimate.cuda.total_bytes)} GPU`
        : "—",
    ],
    ["Created", dateTime(j.created_at)],
    ["Started", dateTime(j.started_at)],
    ["Finished", dateTime(j.finished_at)],
    ["Run time", j.started_at ? duration((j.finished_at ?? Date.now() / 1000) - j.started_at) : "—"],
    ["Attempt", `${j.attempt} of ${j.max_attempts}`],
  ];
  return (
    <section class="card summary" aria-label="Progress">
      <div class="summary-bar">
        <ProgressBar job={j} />
        <span class={`live live-${props.live}`} role="status" aria-live="polite">
          {props.live === "live" ? "● live" : props.live === "reconnecting" ? "reconnecting…" : props.live === "ended" ? "stream ended" : "connecting…"}
        </span>
      </div>
      <dl class="stats">
        {items.map(([k, v]) => (
          <div>
            <dt>{k}</dt>
            <dd data-stat={k}>{v}</dd>
          </div>
        ))}
      </dl>
    </section>
  );
}

function Curvesection(props: { curves: Curves; version: number }) {
  const c = props.curves;
  const charts = useMemo(() => {
    const pick = (title: string, testId: string, parts: [Curve, SeriesSpec][], log = false) => {
      const present = parts.filter(([k]) => c.has(k));
      const shown = present.length ? present : parts.slice(0, 1);
      return { title, testId, series: shown.map(([, s]) => s), data: c.columns(shown.map(([k]) => k)), log };
    };
    return [
      pick("Loss", "chart-loss", [
        ["train_loss", { label: "train", color: TRAIN }],
        ["valid_loss", { label: "validation", color: VALID }],
      ]),
      pick("Accuracy", "chart-accuracy", [
        ["train_accuracy", { label: "train", color: TRAIN }],
        ["valid_accuracy", { label: "validation", color: VALID }],
      ]),
      pick("Learning rate", "chart-lr", [["learning_rate", { label: "learning rate", color: "#16a34a" }]]),
      pick("Tokens per second", "chart-tps", [["tokens_per_second", { label: "tokens/s", color: "#9333ea" }]]),
    ];
  }, [c, props.version]);
  return (
    <Section title="Curves">
      {c.size === 0 && <p class="muted">No metrics yet: the curves fill in as the job trains.</p>}
      <div class="charts">
        {charts.map((ch) => (
          <Chart title={ch.title} series={ch.series} data={ch.data} log={ch.log} testId={ch.testId} height={200} />
        ))}
      </div>
    </Section>
  );
}

function EventLog(props: { events: JobEvent[] }) {
  const [metrics, setMetrics] = useState(true);
  const shown = metrics ? props.events : props.events.filter((e) => e.type !== "metrics");
  return (
    <Section
      title="Events"
      actions={
        <label class="small">
          <input type="checkbox" checked={metrics} onChange={() => setMetrics(!metrics)} /> metrics
        </label>
      }
    >
      <div class="log" tabIndex={0} aria-label="Event log, newest first">
        {shown.length === 0 && <p class="muted">No events yet.</p>}
        <ol>
          {shown.map((e) => (
            <li class={`level-${e.level}`} data-event-type={e.type}>
              <time class="muted">{dateTime(e.created_at).slice(11)}</time> <span>{e.message}</span>
            </li>
          ))}
        </ol>
      </div>
    </Section>
  );
}

function Hyperparameters(props: { job: Job }) {
  const j = props.job;
  const hp = methodHyperparameters(j) ?? j.hyperparameters ?? {};
  const rows: [string, unknown][] = [
    ["model", j.model],
    ["training_file", j.training_file],
    ["validation_file", j.validation_file],
    ["seed", j.seed],
    ["suffix", j.user_provided_suffix],
    ...Object.entries(hp),
  ];
  if (j.metadata) rows.push(["metadata", j.metadata]);
  return (
    <Section title="Hyperparameters (resolved)">
      <table class="kv" data-testid="hyperparameters">
        <tbody>
          {rows.map(([k, v]) => (
            <tr>
              <th scope="row">{k}</th>
              <td class="mono" data-key={k}>
                {v === null || v === undefined ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v)}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </Section>
  );
}

/** Checkpoints and the final model, each downloadable whole (tar) or file by file. */
function Models(props: { job: Job; version: number }) {
  const j = props.job;
  const ckpts = usePoll(
    () => get<ListPage<Checkpoint>>(`${jobPath(j.id)}/checkpoints`, { limit: 100 }),
    [j.id, props.version, j.status],
  );
  const metricKeys = useMemo(() => {
    const keys = new Set<string>();
    // The quality numbers; speeds and timings are in the curves and the event log.
    for (const c of ckpts.value?.data ?? [])
      for (const [k, v] of Object.entries(c.metrics ?? {})) if (typeof v === "number" && /loss|accuracy|f1/.test(k)) keys.add(k);
    return [...keys].sort();
  }, [ckpts.value]);
  const base = jobPath(j.id);
  return (
    <Section title="Model and checkpoints" id="models">
      {j.status === "succeeded" && j.fine_tuned_model ? (
        <div class="final">
          <p>
            Final model <span class="mono">{j.fine_tuned_model}</span>
          </p>
          <Downloads listPath={`${base}/artifacts`} tarPath={`${base}/artifacts.tar`} name={`${j.id}-final`} label="final model" />
        </div>
      ) : (
        <p class="muted">{isTerminal(j.status) ? "This job has no final model." : "The final model appears here when the job succeeds."}</p>
      )}
      <ErrorBox error={ckpts.error} />
      {ckpts.value && ckpts.value.data.length > 0 && (
        <div class="table-wrap">
          <table class="checkpoints">
            <thead>
              <tr>
                <th scope="col">Step</th>
                <th scope="col">Saved</th>
                {metricKeys.map((k) => (
                  <th scope="col">{k}</th>
                ))}
                <th scope="col">Download</th>
              </tr>
            </thead>
            <tbody>
              {ckpts.value.data.map((c) => (
                <tr data-checkpoint={c.id}>
                  <td>{c.step_number}</td>
                  <td class="nowrap">{dateTime(c.created_at)}</td>
                  {metricKeys.map((k) => (
                    <td>{num(c.metrics?.[k])}</td>
                  ))}
                  <td>
                    <Downloads
                      listPath={`${base}/checkpoints/${encodeURIComponent(c.id)}/artifacts`}
                      tarPath={`${base}/checkpoints/${encodeURIComponent(c.id)}/artifacts.tar`}
                      name={`${j.id}-step-${c.step_number}`}
                      label={`checkpoint at step ${c.step_number}`}
                    />
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </Section>
  );
}

function Downloads(props: { listPath: string; tarPath: string; name: string; label: string }) {
  const [files, setFiles] = useState<ArtifactFile[] | null>(null);
  const [open, setOpen] = useState(false);
  const [error, setError] = useState<unknown>(null);
  const [busy, setBusy] = useState<string | null>(null);
  const save = async (path: string, filename: string) => {
    setBusy(filename);
    setError(null);
    try {
      await download(path, filename);
    } catch (e) {
      setError(e);
    } finally {
      setBusy(null);
    }
  };
  const toggle = async () => {
    const next = !open;
    setOpen(next);
    if (next && !files) {
      try {
        setFiles((await get<{ data: ArtifactFile[] }>(props.listPath)).data);
      } catch (e) {
        setError(e);
      }
    }
  };
  return (
    <div class="downloads">
      <button onClick={() => save(props.tarPath, `${props.name}.tar`)} disabled={busy !== null} aria-label={`Download the ${props.label} as tar`}>
        {busy === `${props.name}.tar` ? "Downloading…" : "Download .tar"}
      </button>
      <button class="link" onClick={toggle} aria-expanded={open}>
        {open ? "Hide files" : "Files"}
      </button>
      <ErrorBox error={error} />
      {open && files && (
        <ul class="files">
          {files.map((f) => (
            <li>
              <button class="link mono" onClick={() => save(`${props.listPath}/${f.path.split("/").map(encodeURIComponent).join("/")}`, f.path.split("/").pop()!)}>
                {f.path}
              </button>{" "}
              <span class="muted small">{bytes(f.bytes)}</span>
            </li>
          ))}
        </ul>
      )}
    </div>
  );
}
