// Compare: the curves of several jobs overlaid on one chart, and a table of what each run
// reached (the best one marked), to tell which run was better.

import { useMemo, useState } from "preact/hooks";
import { get, isTerminal, jobPath, listAll, methodHyperparameters, type Job, type JobEvent, type ListPage } from "../api";
import { Chart, PALETTE } from "../chart";
import { num } from "../format";
import { Curves, CURVE_LABELS, type Curve } from "../metrics";
import { Link, navigate } from "../router";
import { ErrorBox, Section, StatusBadge, usePoll } from "../ui";

const METRICS: Curve[] = ["train_loss", "valid_loss", "train_accuracy", "valid_accuracy", "learning_rate", "tokens_per_second"];

interface Run {
  job: Job;
  curves: Curves;
}

async function loadRun(id: string): Promise<Run> {
  const [job, events] = await Promise.all([get<Job>(jobPath(id)), listAll<JobEvent>(`${jobPath(id)}/events`)]);
  const curves = new Curves();
  for (const ev of events.reverse()) curves.add(ev);
  return { job, curves };
}

export function ComparePage(props: { query: URLSearchParams }) {
  const ids = (props.query.get("jobs") ?? "").split(",").map(decodeURIComponent).filter(Boolean);
  const metric = (props.query.get("metric") as Curve) || "train_loss";
  const key = ids.join(",");
  const runs = usePoll(() => Promise.all(ids.map(loadRun)), [key], 5000, (rs) => rs.some((r) => !isTerminal(r.job.status)));
  const setQuery = (jobs: string[], m: Curve) => {
    const q = new URLSearchParams();
    if (jobs.length) q.set("jobs", jobs.map(encodeURIComponent).join(","));
    if (m !== "train_loss") q.set("metric", m);
    navigate(`/compare?${q.toString()}`, true);
  };

  const chart = useMemo(() => {
    const rs = (runs.value ?? []).filter((r) => r.curves.has(metric));
    const steps = new Set<number>();
    const cols = rs.map((r) => {
      const [s, v] = r.curves.columns([metric]);
      s.forEach((x) => steps.add(x));
      return new Map(s.map((x, i) => [x, v[i]]));
    });
    const x = [...steps].sort((a, b) => a - b);
    const data: [number[], ...(number | null)[][]] = [x, ...cols.map((c) => x.map((s) => c.get(s) ?? null))];
    const series = rs.map((r) => ({ label: r.job.user_provided_suffix ? `${r.job.id} (${r.job.user_provided_suffix})` : r.job.id, color: PALETTE[ids.indexOf(r.job.id) % PALETTE.length] }));
    return { data, series };
  }, [runs.value, metric]);

  const lower = !metric.endsWith("accuracy") && metric !== "tokens_per_second";
  const best = useMemo(() => {
    // The better run: lowest best validation loss, else lowest final train loss.
    const rs = runs.value ?? [];
    const score = (r: Run) => r.curves.best("valid_loss", true) ?? r.curves.last("train_loss");
    let out: string | null = null;
    let bestScore = Infinity;
    for (const r of rs) {
      const s = score(r);
      if (s !== null && s < bestScore) {
        bestScore = s;
        out = r.job.id;
      }
    }
    return rs.length > 1 ? out : null;
  }, [runs.value]);

  return (
    <>
      <div class="page-head">
        <h1>Compare</h1>
      </div>
      <Picker ids={ids} onChange={(next) => setQuery(next, metric)} />
      <ErrorBox error={runs.error} />
      {ids.length > 0 && (
        <Section
          title={`${CURVE_LABELS[metric]} by step`}
          actions={
            <label>
              Metric{" "}
              <select value={metric} onChange={(e) => setQuery(ids, (e.target as HTMLSelectElement).value as Curve)}>
                {METRICS.map((m) => (
                  <option value={m}>{CURVE_LABELS[m]}</option>
                ))}
              </select>
            </label>
          }
        >
          {runs.value && chart.series.length === 0 && <p class="muted">None of these jobs logged {CURVE_LABELS[metric]} yet.</p>}
          {chart.series.length > 0 && <Chart title={CURVE_LABELS[metric]} series={chart.series} data={chart.data} height={320} testId="chart-compare" />}
        </Section>
      )}
      {runs.value && runs.value.length > 0 && (
        <Section title="Runs">
          <div class="table-wrap">
            <table class="compare">
              <thead>
                <tr>
                  <th scope="col">Job</th>
                  <th scope="col">Status</th>
                  <th scope="col">Model</th>
                  <th scope="col">Method</th>
                  <th scope="col">LR</th>
                  <th scope="col">Steps</th>
                  <th scope="col">Final train loss</th>
                  <th scope="col">Best validation loss</th>
                  <th scope="col">Best accuracy</th>
                  <th scope="col">{lower ? "Lowest" : "Highest"} {CURVE_LABELS[metric]}</th>
                </tr>
              </thead>
              <tbody>
                {runs.value.map((r, i) => {
                  const hp = methodHyperparameters(r.job) ?? {};
                  const acc = r.curves.best("valid_accuracy", false) ?? r.curves.best("train_accuracy", false);
                  return (
                    <tr data-job={r.job.id} class={best === r.job.id ? "best" : undefined}>
                      <td>
                        <span class="swatch" style={{ background: PALETTE[i % PALETTE.length] }} aria-hidden="true" />
                        <Link href={`/jobs/${encodeURIComponent(r.job.id)}`} class="mono">
                          {r.job.id}
                        </Link>
                        {best === r.job.id && <span class="badge best-badge">best</span>}
                      </td>
                      <td>
                        <StatusBadge status={r.job.status} />
                      </td>
                      <td class="mono">{r.job.model}</td>
                      <td>{String(hp.training_type ?? "—")}</td>
                      <td>{num(hp.learning_rate as number)}</td>
                      <td>{r.job.progress?.step ?? "—"}</td>
                      <td data-col="final-train-loss">{num(r.curves.last("train_loss"))}</td>
                      <td>{num(r.curves.best("valid_loss", true))}</td>
                      <td>{num(acc)}</td>
                      <td>{num(r.curves.best(metric, lower))}</td>
                    </tr>
                  );
                })}
              </tbody>
            </table>
          </div>
          {best && (
            <p class="small muted">
              Marked best: the lowest validation loss (or, without evaluations, the lowest final train loss).
            </p>
          )}
        </Section>
      )}
    </>
  );
}

/** Chooses the jobs: the most recent ones, ticked on or off. */
function Picker(props: { ids: string[]; onChange: (ids: string[]) => void }) {
  const recent = usePoll(() => get<ListPage<Job>>("/v1/fine_tuning/jobs", { limit: 50 }), []);
  const [open, setOpen] = useState(props.ids.length < 2);
  const jobs = recent.value?.data ?? [];
  return (
    <Section
      title={`Jobs (${props.ids.length} chosen)`}
      actions={
        <button class="link" onClick={() => setOpen(!open)} aria-expanded={open}>
          {open ? "Hide list" : "Choose jobs"}
        </button>
      }
    >
      {props.ids.length < 2 && <p class="muted">Choose two or more jobs to overlay their curves.</p>}
      {open && (
        <fieldset class="picker">
          <legend class="sr-only">Jobs to compare</legend>
          {jobs.map((j) => (
            <label>
              <input
                type="checkbox"
                value={j.id}
                checked={props.ids.includes(j.id)}
                onChange={() => props.onChange(props.ids.includes(j.id) ? props.ids.filter((x) => x !== j.id) : [...props.ids, j.id])}
              />{" "}
              <span class="mono">{j.id}</span> <StatusBadge status={j.status} /> <span class="muted small">{j.model}{j.user_provided_suffix ? ` · ${j.user_provided_suffix}` : ""}</span>
            </label>
          ))}
          {recent.value && jobs.length === 0 && <p class="muted">No jobs yet.</p>}
        </fieldset>
      )}
    </Section>
  );
}
