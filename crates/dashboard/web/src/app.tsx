// The shell: sign-in with an API key, the navigation bar and the page of the current path.

import { useEffect, useState } from "preact/hooks";
import { apiKey, checkKey, setApiKey, whenUnauthorized, ApiError } from "./api";
import { Link, useLocation } from "./router";
import { JobsPage } from "./pages/jobs";
import { JobPage } from "./pages/job";
import { ComparePage } from "./pages/compare";
import { NewJobPage } from "./pages/newjob";
import { ModelsPage, ModelPage } from "./pages/models";

export function App() {
  const [key, setKey] = useState(apiKey());
  const [notice, setNotice] = useState<string | null>(null);
  useEffect(() => {
    whenUnauthorized((message) => {
      setApiKey(null);
      setNotice(`Signed out: ${message}`);
      setKey(null);
    });
  }, []);
  if (!key) {
    return (
      <Login
        notice={notice}
        onKey={(k) => {
          setApiKey(k);
          setNotice(null);
          setKey(k);
        }}
      />
    );
  }
  return (
    <Shell
      onSignOut={() => {
        setApiKey(null);
        setKey(null);
      }}
    />
  );
}

function Login(props: { notice: string | null; onKey: (key: string) => void }) {
  const [value, setValue] = useState("");
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  return (
    <main class="login">
      <h1>tuna</h1>
      <p class="muted">Fine-tuning job server. Sign in with an API key.</p>
      <form
        onSubmit={async (e) => {
          e.preventDefault();
          const k = value.trim();
          if (!k) {
            setError("Enter an API key.");
            return;
          }
          setBusy(true);
          setError(null);
          try {
            await checkKey(k);
            props.onKey(k);
          } catch (err) {
            const e = err as ApiError;
            setError(e.status === 401 ? `This API key was refused: ${e.message}` : e.message);
          } finally {
            setBusy(false);
          }
        }}
      >
        <label for="api-key">API key</label>
        <input
          id="api-key"
          type="password"
          autocomplete="current-password"
          placeholder="sk-…"
          value={value}
          autofocus
          onInput={(e) => setValue((e.target as HTMLInputElement).value)}
          aria-invalid={error ? "true" : undefined}
          aria-describedby="login-help"
        />
        <p id="login-help" class="muted small">
          <code>tuna serve</code> writes the first admin key to <code>.tuna/admin_key</code>; <code>tuna keys create</code> makes more. The key is kept in
          this browser tab only.
        </p>
        {(error || props.notice) && (
          <p class="error" role="alert">
            {error ?? props.notice}
          </p>
        )}
        <button type="submit" disabled={busy}>
          {busy ? "Checking…" : "Sign in"}
        </button>
      </form>
    </main>
  );
}

const NAV: [string, string][] = [
  ["/jobs", "Jobs"],
  ["/new", "New job"],
  ["/compare", "Compare"],
  ["/models", "Models"],
];

function Shell(props: { onSignOut: () => void }) {
  const loc = useLocation();
  const path = loc.path === "/" ? "/jobs" : loc.path;
  let page;
  let m: RegExpMatchArray | null;
  if (path === "/jobs") page = <JobsPage query={loc.query} />;
  else if ((m = path.match(/^\/jobs\/([^/]+)$/))) page = <JobPage id={decodeURIComponent(m[1])} />;
  else if (path === "/compare") page = <ComparePage query={loc.query} />;
  else if (path === "/new") page = <NewJobPage />;
  else if (path === "/models") page = <ModelsPage />;
  else if ((m = path.match(/^\/models\/(.+)$/))) page = <ModelPage id={decodeURIComponent(m[1])} />;
  else page = <p class="error">No page at {path}.</p>;
  const section = NAV.find(([href]) => path === href || path.startsWith(href + "/"))?.[0];
  return (
    <>
      <a class="skip" href="#main">
        Skip to content
      </a>
      <header class="top">
        <Link href="/jobs" class="brand">
          tuna
        </Link>
        <nav aria-label="Main">
          {NAV.map(([href, label]) => (
            <Link href={href} aria-current={section === href ? "page" : undefined}>
              {label}
            </Link>
          ))}
        </nav>
        <button class="link" onClick={props.onSignOut}>
          Sign out
        </button>
      </header>
      <main id="main" tabIndex={-1}>
        {page}
      </main>
    </>
  );
}
