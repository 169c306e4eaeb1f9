// Jobs: every job of the organisation, newest first, a page at a time as the API pages
// (`after` = the last job of the previous page), filtered by status and model.

import { useState } from "preact/hooks";
import { get, isTerminal, STATUSES, type Job, type ListPage, type Model } from "../api";
import { dateTime } from "../format";
import { Link, navigate } from "../router";
import { ErrorBox, eta, ProgressBar, StatusBadge, usePoll } from "../ui";

const PAGE = 20;

export function JobsPage(props: { query: URLSearchParams }) {
  const status = props.query.get("status") ?? "";
  const model = props.query.get("model") ?? "";
  // Cursors of the pages before this one, and this page's.
  const [cursors, setCursors] = useState<(string | undefined)[]>([]);
  const [after, setAfter] = useState<string | undefined>(undefined);
  const [selected, setSelected] = useState<string[]>([]);
  const filterKey = `${status}|${model}`;
  const [lastFilter, setLastFilter] = useState(filterKey);
  if (lastFilter !== filterKey) {
    setLastFilter(filterKey);
    setCursors([]);
    setAfter(undefined);
  }
  const jobs = usePoll(
    () => get<ListPage<Job>>("/v1/fine_tuning/jobs", { limit: PAGE, after, status, model }),
    [after, status, model],
    3000,
    (page) => page.data.some((j) => !isTerminal(j.status)),
  );
  const models = usePoll(() => get<ListPage<Model>>("/v1/models"), []);

  const setFilter = (k: string, v: string) => {
    const q = new URLSearchParams(props.query);
    if (v) q.set(k, v);
    else q.delete(k);
    const qs = q.toString();
    navigate(qs ? `/jobs?${qs}` : "/jobs", true);
  };
  const toggle = (id: string) => setSelected((s) => (s.includes(id) ? s.filter((x) => x !== id) : [...s, id]));
  const page = jobs.value;

  return (
    <>
      <div class="page-head">
        <h1>Jobs</h1>
        <Link href="/new" class="button">
          New job
        </Link>
      </div>
      <div class="toolbar" role="search">
        <label>
          Status{" "}
          <select value={status} onChange={(e) => setFilter("status", (e.target as HTMLSelectElement).value)} name="status">
            <option value="">all</option>
            {STATUSES.map((s) => (
              <option value={s}>{s.replace("_", " ")}</option>
            ))}
          </select>
        </label>
        <label>
          Model{" "}
          <select value={model} onChange={(e) => setFilter("model", (e.target as HTMLSelectElement).value)} name="model">
            <option value="">all</option>
            {(models.value?.data ?? []).map((m) => (
              <option value={m.id}>{m.id}</option>
            ))}
            {model && !(models.value?.data ?? []).some((m) => m.id === model) && <option value={model}>{model}</option>}
          </select>
        </label>
        <button
          disabled={selected.length < 2}
          onClick={() => navigate(`/compare?jobs=${selected.map(encodeURIComponent).join(",")}`)}
          title="Select two or more jobs in the table"
        >
          Compare selected ({selected.length})
        </button>
      </div>
      <ErrorBox error={jobs.error} />
      <div class="table-wrap">
        <table class="jobs">
          <thead>
            <tr>
              <th scope="col">
                <span class="sr-only">Select</span>
              </th>
              <th scope="col">Job</th>
              <th scope="col">Status</th>
              <th scope="col">Model</th>
              <th scope="col">Task</th>
              <th scope="col">Progress</th>
              <th scope="col">ETA</th>
              <th scope="col">Created</th>
              <th scope="col">Finished</th>
            </tr>
          </thead>
          <tbody>
            {page?.data.map((j) => (
              <tr data-job={j.id}>
                <td>
                  <input type="checkbox" checked={selected.includes(j.id)} onChange={() => toggle(j.id)} aria-label={`select ${j.id} to compare`} />
                </td>
                <td>
                  <Link href={`/jobs/${encodeURIComponent(j.id)}`} class="mono">
                    {j.id}
                  </Link>
                  {j.user_provided_suffix && <span class="muted small"> {j.user_provided_suffix}</span>}
                </td>
                <td>
                  <StatusBadge status={j.status} />
                </td>
                <td class="mono">{j.model}</td>
                <td>{j.task ?? "—"}</td>
                <td>
                  <ProgressBar job={j} />
                </td>
                <td>{eta(j)}</td>
                <td class="nowrap">{dateTime(j.created_at)}</td>
                <td class="nowrap">{dateTime(j.finished_at)}</td>
              </tr>
            ))}
          </tbody>
        </table>
        {page && page.data.length === 0 && (
          <p class="empty">
            {status || model ? "No job matches these filters." : "No jobs yet."} <Link href="/new">Create one</Link>.
          </p>
        )}
      </div>
      <nav class="pager" aria-label="Pages">
        <button
          disabled={cursors.length === 0}
          onClick={() => {
            setAfter(cursors[cursors.length - 1]);
            setCursors(cursors.slice(0, -1));
          }}
        >
          ← Newer
        </button>
        <span class="muted small">Page {cursors.length + 1}</span>
        <button
          disabled={!page?.has_more}
          onClick={() => {
            setCursors([...cursors, after]);
            setAfter(page!.data[page!.data.length - 1].id);
          }}
        >
          Older →
        </button>
      </nav>
    </>
  );
}
