"""The service's HTTP API as one HTML page, written from its OpenAPI description.

FastAPI's own ``/docs`` page loads Swagger UI from a CDN and is blank without internet, which many
lab machines lack; this page needs nothing but the server. ``/openapi.json`` stays for tools.
"""

from __future__ import annotations

from html import escape


def _kind(schema: dict) -> str:
    """A value's type as a reader says it: ``binary`` (a file), ``string``, ``integer | null``..."""
    return schema.get("format") or schema.get("type") or " | ".join(_kind(s) for s in schema.get("anyOf", []))


def _schema_fields(schema: dict) -> list[tuple[str, str, bool, str]]:
    """(name, type, required, description) of each property of an object schema."""
    required = set(schema.get("required", []))
    return [(name, _kind(prop), name in required, prop.get("description", ""))
            for name, prop in schema.get("properties", {}).items()]


def _table(rows: list[tuple[str, str, bool, str]], where: str) -> str:
    """The table rows of (name, type, required, description) fields passed ``where``."""
    return "".join(f"<tr><td><code>{escape(n)}</code>{' (required)' if req else ''}</td><td>{escape(where)}</td>"
                   f"<td>{escape(kind)}</td><td>{escape(text)}</td></tr>" for n, kind, req, text in rows)


def _operation(method: str, path: str, op: dict) -> str:
    rows = _table([(p["name"], _kind(p.get("schema", {})), bool(p.get("required")), p.get("description", ""))
                   for p in op.get("parameters", [])], "query")
    for content_type, content in op.get("requestBody", {}).get("content", {}).items():
        rows += _table(_schema_fields(content.get("schema", {})), f"form ({content_type})")
    answers = "".join(f"<li><code>{escape(code)}</code> {escape(r.get('description', ''))}: "
                      f"{escape(', '.join(r.get('content', {})))}</li>" for code, r in op.get("responses", {}).items())
    parts = [f'<section id="{escape(method + path)}"><h2><code>{method.upper()} {escape(path)}</code></h2>',
             f"<p>{escape(op.get('summary', ''))}</p>"]
    if op.get("description"):
        parts.append(f"<p>{escape(op['description'])}</p>")
    if rows:
        parts.append("<table><tr><th>field</th><th>in</th><th>type</th><th>meaning</th></tr>" + rows + "</table>")
    parts.append(f"<p>Answers:</p><ul>{answers}</ul></section>")
    return "\n".join(parts)


def api_page(spec: dict, base: str = "http://127.0.0.1:8000/") -> str:
    """The HTML page of an OpenAPI ``spec`` (as ``FastAPI.openapi()`` returns it), its example
    addressed to the server at ``base``."""
    info = spec.get("info", {})
    operations = [(m, p, op) for p, ops in spec.get("paths", {}).items() for m, op in ops.items()
                  if not op.get("deprecated")]
    index = "".join(f'<li><a href="#{escape(m + p)}"><code>{m.upper()} {escape(p)}</code></a> '
                    f"{escape(op.get('summary', ''))}</li>" for m, p, op in operations)
    return f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{escape(info.get('title', 'API'))} {escape(info.get('version', ''))}: HTTP API</title>
  <link rel="stylesheet" href="/static/style.css">
</head>
<body>
  <main>
  <h1>{escape(info.get('title', 'API'))} {escape(info.get('version', ''))}: HTTP API</h1>
  <p>{escape(info.get('description', ''))}</p>
  <p>Example: <code>curl -F file=@image.png {escape(base)}segment</code>. The same description for
  tools: <a href="/openapi.json">/openapi.json</a>. The web page: <a href="/">/</a>.</p>
  <ul>{index}</ul>
  {''.join(_operation(m, p, op) for m, p, op in operations)}
  </main>
</body>
</html>
"""
