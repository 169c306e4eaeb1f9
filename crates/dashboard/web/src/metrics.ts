// The curves of a job, from its `metrics` events: each training log carries `step`,
// `train_loss`, the task's accuracy, `learning_rate` and `tokens_per_second`; each evaluation
// carries `step`, `valid_loss` and the validation accuracy.

import type { JobEvent } from "./api";

export type Curve = "train_loss" | "valid_loss" | "train_accuracy" | "valid_accuracy" | "learning_rate" | "tokens_per_second";

export const CURVE_LABELS: Record<Curve, string> = {
  train_loss: "train loss",
  valid_loss: "validation loss",
  train_accuracy: "train accuracy",
  valid_accuracy: "validation accuracy",
  learning_rate: "learning rate",
  tokens_per_second: "tokens/s",
};

type Row = Partial<Record<Curve, number>>;

function value(d: Record<string, unknown>, ...keys: string[]): number | undefined {
  for (const k of keys) {
    const v = d[k];
    if (typeof v === "number" && isFinite(v)) return v;
  }
  return undefined;
}

/** Every logged value by step. */
export class Curves {
  private rows = new Map<number, Row>();
  private seen = new Set<string>();
  /** Latest step's total (from training logs). */
  totalSteps: number | null = null;

  /** Adds a job event; false when it carried nothing new (not metrics, or seen before). */
  add(ev: JobEvent): boolean {
    if (ev.type !== "metrics" || !ev.data || this.seen.has(ev.id)) return false;
    this.seen.add(ev.id);
    const d = ev.data;
    const step = value(d, "step");
    if (step === undefined) return false;
    const row = this.rows.get(step) ?? {};
    const set = (k: Curve, v: number | undefined) => {
      if (v !== undefined) row[k] = v;
    };
    set("train_loss", value(d, "train_loss"));
    // DPO's accuracy is the share of pairs whose preferred answer has the higher reward.
    set("train_accuracy", value(d, "train_mean_token_accuracy", "train_accuracy", "train_rewards/accuracies"));
    set("learning_rate", value(d, "learning_rate"));
    set("tokens_per_second", value(d, "tokens_per_second"));
    set("valid_loss", value(d, "valid_loss"));
    set("valid_accuracy", value(d, "valid_mean_token_accuracy", "valid_accuracy", "valid_rewards/accuracies"));
    const total = value(d, "total_steps");
    if (total !== undefined) this.totalSteps = total;
    this.rows.set(step, row);
    return true;
  }

  get size(): number {
    return this.rows.size;
  }

  /** Steps (ascending) and one column per curve, null where a step has no value. */
  columns(curves: Curve[]): [number[], ...(number | null)[][]] {
    const steps = [...this.rows.keys()].sort((a, b) => a - b);
    const cols = curves.map((c) => steps.map((s) => this.rows.get(s)![c] ?? null));
    return [steps, ...cols];
  }

  has(c: Curve): boolean {
    for (const r of this.rows.values()) if (r[c] !== undefined) return true;
    return false;
  }

  /** The last logged value of a curve. */
  last(c: Curve): number | null {
    let best: [number, number] | null = null;
    for (const [s, r] of this.rows) if (r[c] !== undefined && (!best || s > best[0])) best = [s, r[c]!];
    return best ? best[1] : null;
  }

  /** The lowest (or highest) logged value of a curve. */
  best(c: Curve, lowest: boolean): number | null {
    let out: number | null = null;
    for (const r of this.rows.values()) {
      const v = r[c];
      if (v !== undefined && (out === null || (lowest ? v < out : v > out))) out = v;
    }
    return out;
  }
}
