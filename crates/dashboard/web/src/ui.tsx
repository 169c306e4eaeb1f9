// Small pieces the pages share.

import type { ComponentChildren } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import type { Job } from "./api";
import { duration, until } from "./format";

export function StatusBadge(props: { status: string }) {
  return <span class={`badge status-${props.status}`}>{props.status.replace("_", " ")}</span>;
}

/** The job's progress as a bar (a real <progress>, read by screen readers) and its percent. */
export function ProgressBar(props: { job: Job }) {
  const p = props.job.progress;
  const done = props.job.status === "succeeded";
  const total = p?.total_steps ?? 0;
  const step = done && total ? total : (p?.step ?? 0);
  const pct = total ? Math.min(100, (step / total) * 100) : done ? 100 : 0;
  const label = total ? `${step}/${total} steps` : done ? "done" : "not started";
  return (
    <span class="progress">
      <progress max={100} value={pct} aria-label={`progress: ${label}`} />
      <span class="small">{total ? `${Math.round(pct)}%` : "—"}</span>
    </span>
  );
}

/** Time left: the trainer's estimate while the job runs. */
export function eta(job: Job): string {
  if (job.status !== "running") return "—";
  const s = job.progress?.seconds_remaining ?? until(job.estimated_finish);
  return s === null || s === undefined ? "—" : duration(s);
}

export function ErrorBox(props: { error: unknown }) {
  if (!props.error) return null;
  const message = props.error instanceof Error ? props.error.message : String(props.error);
  return (
    <p class="error" role="alert">
      {message}
    </p>
  );
}

export function Section(props: { title: string; children: ComponentChildren; actions?: ComponentChildren; id?: string }) {
  return (
    <section class="card" aria-labelledby={props.id ? `${props.id}-title` : undefined}>
      <header class="card-head">
        <h2 id={props.id ? `${props.id}-title` : undefined}>{props.title}</h2>
        {props.actions}
      </header>
      {props.children}
    </section>
  );
}

/** Runs `load` now, again when `deps` change, and every `everyMs` while `repeat()` holds. */
export function usePoll<T>(load: () => Promise<T>, deps: unknown[], everyMs = 0, repeat: (v: T) => boolean = () => true) {
  const [value, setValue] = useState<T | null>(null);
  const [error, setError] = useState<unknown>(null);
  const gen = useRef(0);
  const [tick, setTick] = useState(0);
  useEffect(() => {
    const mine = ++gen.current;
    let timer: number | undefined;
    load().then(
      (v) => {
        if (mine !== gen.current) return;
        setValue(v);
        setError(null);
        if (everyMs && repeat(v)) timer = window.setTimeout(() => setTick((t) => t + 1), everyMs);
      },
      (e) => {
        if (mine !== gen.current) return;
        setError(e);
        if (everyMs) timer = window.setTimeout(() => setTick((t) => t + 1), everyMs * 2);
      },
    );
    return () => window.clearTimeout(timer);
  }, [...deps, tick]);
  return { value, error, reload: () => setTick((t) => t + 1), set: setValue };
}
