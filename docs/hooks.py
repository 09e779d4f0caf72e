"""MkDocs hook: fail the build when a public name has no API reference entry.

Every name in `qkclip_eqx.__all__`, and every public function of `qkclip_eqx.hf`,
must appear as a `::: qkclip_eqx.NAME` block in a page under `docs/api/`.
"""

import inspect
import re

from mkdocs.exceptions import PluginError

_DIRECTIVE = re.compile(r"^::: *(qkclip_eqx\.[\w.]+)", re.MULTILINE)
_documented: set[str] = set()


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri.startswith("api/"):
        _documented.update(_DIRECTIVE.findall(markdown))
    return markdown


def on_post_build(config):
    import qkclip_eqx
    import qkclip_eqx.hf

    public = {f"qkclip_eqx.{name}" for name in qkclip_eqx.__all__ if name != "hf"}
    public |= {
        f"qkclip_eqx.hf.{name}"
        for name, obj in vars(qkclip_eqx.hf).items()
        if not name.startswith("_")
        and inspect.isfunction(obj)
        and obj.__module__ == "qkclip_eqx.hf"
    }
    missing = sorted(public - _documented)
    if missing:
        raise PluginError(
            f"public names with no `::: name` entry under docs/api/: {', '.join(missing)}"
        )
