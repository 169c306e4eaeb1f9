// Builds the dashboard into dist/: one script and one stylesheet under dist/assets, named by
// their content hash (served as immutable), and dist/index.html pointing at them (served as
// no-cache). `node build.mjs --watch` rebuilds on every change. crates/dashboard/build.rs
// embeds dist/ into the tuna binary.
import * as esbuild from "esbuild";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import path from "node:path";

const watch = process.argv.includes("--watch");
const dist = "dist";

/** Writes dist/index.html with the hashed names of this build's outputs. */
const html = {
  name: "index-html",
  setup(build) {
    build.onEnd(async (result) => {
      if (result.errors.length) return;
      const outputs = Object.keys(result.metafile.outputs).map((p) => "/" + path.relative(dist, p));
      const js = outputs.find((p) => p.endsWith(".js"));
      const css = outputs.find((p) => p.endsWith(".css"));
      const page = (await readFile("index.html", "utf8"))
        .replace("%APP_CSS%", css)
        .replace("%APP_JS%", js);
      await writeFile(path.join(dist, "index.html"), page);
      console.log(`dashboard built: ${js}, ${css}`);
    });
  },
};

await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
const options = {
  entryPoints: { app: "src/main.tsx" },
  bundle: true,
  minify: !watch,
  format: "esm",
  target: ["es2022"],
  outdir: path.join(dist, "assets"),
  entryNames: "[name]-[hash]",
  metafile: true,
  jsx: "automatic",
  jsxImportSource: "preact",
  legalComments: "linked",
  logLevel: "warning",
  plugins: [html],
};
if (watch) {
  await (await esbuild.context(options)).watch();
} else {
  await esbuild.build(options);
}
