// The dashboard's only way to the server: tuna's own /v1 API, with the user's API key as a
// Bearer token. The key lives in sessionStorage (this tab, until it closes or signs out).

const KEY = "tuna.apiKey";

export function apiKey(): string | null {
  return sessionStorage.getItem(KEY);
}

export function setApiKey(key: string | null): void {
  if (key === null) sessionStorage.removeItem(KEY);
  else sessionStorage.setItem(KEY, key);
}

/** An error answered by the API (OpenAI's shape) or a failed connection (status 0). */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly param: string | null = null,
    readonly code: string | null = null,
  ) {
    super(message);
  }
}

/** Called when the server refuses the key (401): the app signs out with the message. */
let onUnauthorized: (message: string) => void = () => {};
export function whenUnauthorized(f: (message: string) => void): void {
  onUnauthorized = f;
}

function headers(extra: Record<string, string> = {}, key = apiKey()): Record<string, string> {
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

async function errorOf(resp: Response): Promise<ApiError> {
  let message = `${resp.status} ${resp.statusText}`;
  let param: string | null = null;
  let code: string | null = null;
  try {
    const body = await resp.json();
    if (body?.error?.message) {
      message = body.error.message;
      param = body.error.param ?? null;
      code = body.error.code ?? null;
    }
  } catch {
    // Not JSON: keep the status line.
  }
  return new ApiError(resp.status, message, param, code);
}

async function send(path: string, init: RequestInit, key?: string): Promise<Response> {
  let resp: Response;
  try {
    resp = await fetch(path, { ...init, headers: headers(init.headers as Record<string, string>, key ?? apiKey()) });
  } catch (e) {
    throw new ApiError(0, `Cannot reach the server (${(e as Error).message}).`);
  }
  if (!resp.ok) {
    const err = await errorOf(resp);
    if (resp.status === 401 && key === undefined) onUnauthorized(err.message);
    throw err;
  }
  return resp;
}

export async function get<T = any>(path: string, query: Record<string, string | number | undefined> = {}): Promise<T> {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== "") q.set(k, String(v));
  const qs = q.toString();
  return (await send(qs ? `${path}?${qs}` : path, { method: "GET" })).json();
}

export async function post<T = any>(path: string, body?: unknown): Promise<T> {
  const init: RequestInit = { method: "POST" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers = { "Content-Type": "application/json" };
  }
  return (await send(path, init)).json();
}

/** Checks a key before it is kept: any answer but 401 means the server takes it. */
export async function checkKey(key: string): Promise<void> {
  await send("/v1/fine_tuning/jobs?limit=1", { method: "GET" }, key);
}

export async function uploadFile(file: File, purpose = "fine-tune"): Promise<FileObject> {
  const form = new FormData();
  form.set("purpose", purpose);
  form.set("file", file, file.name);
  return (await send("/v1/files", { method: "POST", body: form })).json();
}

/** Every item of a list endpoint, following `after` (at most `max` items). */
export async function listAll<T extends { id: string }>(path: string, query: Record<string, string> = {}, max = 10000): Promise<T[]> {
  const out: T[] = [];
  let after: string | undefined;
  for (;;) {
    const page = await get<ListPage<T>>(path, { ...query, limit: 100, after });
    out.push(...page.data);
    if (!page.has_more || page.data.length === 0 || out.length >= max) return out;
    after = page.data[page.data.length - 1].id;
  }
}

/**
 * Saves a download. The API needs the key in a header, which a plain link cannot send, so the
 * file is fetched and handed to the browser as a blob (held in memory: for large models,
 * `tuna download` resumes and checks sha256).
 */
export async function download(path: string, filename: string): Promise<void> {
  const resp = await send(path, { method: "GET" });
  const url = URL.createObjectURL(await resp.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

export interface SseHandlers {
  event(ev: JobEvent): void;
  /** The job ended and every event was sent. */
  end(status: string): void;
  /** Connected (true) or lost and retrying (false). */
  connection(connected: boolean): void;
}

/**
 * Follows `GET …/events/stream` (server-sent events, read through fetch so that the key goes in
 * a header). A broken or ended-too-early stream is reopened after a pause with `Last-Event-ID`,
 * so no event is missed or repeated. Returns a function that stops following.
 */
export function followEvents(jobId: string, h: SseHandlers): () => void {
  const stop = new AbortController();
  let lastId: string | null = null;
  (async () => {
    let delay = 500;
    while (!stop.signal.aborted) {
      try {
        const extra: Record<string, string> = { Accept: "text/event-stream" };
        if (lastId) extra["Last-Event-ID"] = lastId;
        const resp = await send(`/v1/fine_tuning/jobs/${encodeURIComponent(jobId)}/events/stream`, {
          method: "GET",
          headers: extra,
          signal: stop.signal,
        });
        h.connection(true);
        delay = 500;
        const reader = resp.body!.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value.replace(/\r\n?/g, "\n");
          let cut: number;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            const msg = parseSse(block);
            if (!msg) continue;
            if (msg.event === "end") {
              h.end(JSON.parse(msg.data).status);
              return;
            }
            if (msg.id) lastId = msg.id;
            h.event(JSON.parse(msg.data));
          }
        }
      } catch (e) {
        if (stop.signal.aborted) return;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500) throw e;
      }
      if (stop.signal.aborted) return;
      h.connection(false);
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, 10_000);
    }
  })().catch(() => h.connection(false));
  return () => stop.abort();
}

function parseSse(block: string): { id?: string; event?: string; data: string } | null {
  const data: string[] = [];
  let id: string | undefined;
  let event: string | undefined;
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "data") data.push(value);
    else if (field === "id") id = value;
    else if (field === "event") event = value;
  }
  if (!data.length) return null;
  return { id, event, data: data.join("\n") };
}

// ---- The objects the API answers (the fields the dashboard reads) ----------------------------

export interface ListPage<T> {
  object: "list";
  data: T[];
  has_more: boolean;
}

export type Status = "validating_files" | "queued" | "running" | "paused" | "succeeded" | "failed" | "cancelled";
export const STATUSES: Status[] = ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];
export const TERMINAL: Status[] = ["succeeded", "failed", "cancelled"];

export interface Job {
  id: string;
  created_at: number;
  finished_at: number | null;
  started_at: number | null;
  estimated_finish: number | null;
  status: Status;
  model: string;
  task: string | null;
  fine_tuned_model: string | null;
  training_file: string | null;
  validation_file: string | null;
  seed: number;
  trained_tokens: number | null;
  user_provided_suffix: string | null;
  error: { code: string; message: string; param: string | null } | null;
  hyperparameters: Record<string, unknown>;
  /** OpenAI's shape: the resolved hyperparameters under `supervised`, or `dpo` for a DPO job. */
  method: {
    type: string;
    supervised?: { hyperparameters: Record<string, unknown> };
    dpo?: { hyperparameters: Record<string, unknown> };
  } | null;
  progress: {
    step?: number;
    total_steps?: number;
    percent?: number | null;
    seconds_remaining?: number | null;
    epoch?: number;
    train_loss?: number;
  } | null;
  metadata: Record<string, string> | null;
  attempt: number;
  max_attempts: number;
  cancel_requested: boolean;
  pause_requested: boolean;
  /** The memory planner's estimate of the job's peak, per accelerator (null: unknown). */
  memory_estimate: { cpu: { total_bytes: number }; cuda: { total_bytes: number } } | null;
}

export interface JobEvent {
  id: string;
  created_at: number;
  level: "info" | "warn" | "error";
  message: string;
  data: Record<string, any> | null;
  type: "message" | "metrics";
}

export interface Checkpoint {
  id: string;
  created_at: number;
  step_number: number;
  fine_tuned_model_checkpoint: string;
  metrics: Record<string, number>;
}

export interface ArtifactFile {
  path: string;
  bytes: number;
  sha256: string;
}

export interface FileObject {
  id: string;
  filename: string;
  bytes: number;
  created_at: number;
  purpose: string;
  status: string;
  status_details: string | null;
  format: string | null;
  example_count: number | null;
}

export interface Architecture {
  model_type?: string;
  family?: string;
  architectures?: string[];
  num_layers?: number;
  num_heads?: number;
  num_kv_heads?: number;
  hidden_size?: number;
  intermediate_size?: number;
  vocab_size?: number;
  context_length?: number;
  num_parameters?: number;
  dtype?: string | null;
  tasks?: string[];
  lora_target_modules?: string[];
  freeze_patterns?: string[];
  [k: string]: unknown;
}

export interface Model {
  id: string;
  created: number;
  owned_by: string;
  kind: "base" | "fine_tuned";
  architecture: Architecture;
  job_id: string | null;
}

export function isTerminal(s: Status): boolean {
  return TERMINAL.includes(s);
}

/** What the job's state allows (the rules of tuna_db::queue's control calls). */
export function allowed(job: Job): { cancel: boolean; pause: boolean; resume: boolean } {
  const active = job.status === "validating_files" || job.status === "queued" || job.status === "paused" || job.status === "running";
  return {
    cancel: active && !job.cancel_requested,
    pause: job.status === "queued" || (job.status === "running" && !job.cancel_requested && !job.pause_requested),
    resume: job.status === "paused",
  };
}

export function jobPath(id: string): string {
  return `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`;
}

/** A job's resolved hyperparameters, under whichever method it runs (`supervised` or `dpo`). */
export function methodHyperparameters(j: Job): Record<string, unknown> | undefined {
  return (j.method?.dpo ?? j.method?.supervised)?.hyperparameters;
}
