// A line chart drawn by uPlot: one x axis (steps) and any number of series.

import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";

export interface SeriesSpec {
  label: string;
  color: string;
  dash?: number[];
}

/** Axis labels: 2e-5 rather than 0, 12k rather than 12,000. */
function tick(v: number | null): string {
  if (v === null) return "";
  const a = Math.abs(v);
  if (a !== 0 && a < 1e-3) return v.toExponential(1);
  if (a >= 1e4) return `${Number((v / 1000).toPrecision(3))}k`;
  return String(Number(v.toPrecision(3)));
}

/** Steps are whole numbers: no tick at 1.5. */
const STEP_INCRS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7];

export const PALETTE = ["#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#db2777"];

export function Chart(props: {
  title: string;
  series: SeriesSpec[];
  data: [number[], ...(number | null)[][]];
  /** Log scale on y (loss curves that fall over orders of magnitude). */
  log?: boolean;
  height?: number;
  testId?: string;
}) {
  const box = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const shape = props.series.map((s) => s.label).join("\u0000") + String(props.log);

  useEffect(() => {
    const el = box.current!;
    const opts: uPlot.Options = {
      width: Math.max(el.clientWidth, 200),
      height: props.height ?? 220,
      scales: { x: { time: false }, y: props.log ? { distr: 3 } : {} },
      axes: [
        { label: "step", stroke: "#64748b", grid: { stroke: "#e2e8f0" }, incrs: STEP_INCRS },
        { stroke: "#64748b", grid: { stroke: "#e2e8f0" }, size: 60, values: (_u, splits) => splits.map(tick) },
      ],
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      series: [
        { label: "step" },
        ...props.series.map((s) => ({
          label: s.label,
          stroke: s.color,
          width: 2,
          dash: s.dash,
          spanGaps: true,
          points: { show: true, size: 4 },
        })),
      ],
    };
    plot.current = new uPlot(opts, props.data as uPlot.AlignedData, el);
    const ro = new ResizeObserver(() => {
      plot.current?.setSize({ width: Math.max(el.clientWidth, 200), height: props.height ?? 220 });
    });
    ro.observe(el);
    return () => {
      ro.disconnect();
      plot.current?.destroy();
      plot.current = null;
    };
  }, [shape]);

  useEffect(() => {
    plot.current?.setData(props.data as uPlot.AlignedData);
  }, [props.data]);

  const points = props.data[0].length;
  return (
    <figure class="chart" data-testid={props.testId} data-points={points}>
      <figcaption>{props.title}</figcaption>
      <div ref={box} role="img" aria-label={`${props.title}: ${props.series.map((s) => s.label).join(", ")}; ${points} steps`} />
    </figure>
  );
}
