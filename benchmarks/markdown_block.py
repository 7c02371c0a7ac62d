"""Replace the lines between a pair of HTML-comment markers in a Markdown file (generated tables)."""
import pathlib


def write_block(path, name: str, lines: list[str]) -> None:
    """Put ``lines`` between ``<!-- name -->`` and ``<!-- /name -->`` in ``path``; exits if they are missing."""
    start, end = f"<!-- {name} -->\n", f"<!-- /{name} -->"
    doc = pathlib.Path(path)
    text = doc.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{doc}: {name} markers not found")
    head, rest = text.split(start, 1)
    doc.write_text(head + start + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])
