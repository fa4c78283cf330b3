"""What the project supports, as the README's support matrix (family x method x release format),
rendered from the code that decides it: the adapters' families (quantlib.adapters.FAMILIES) and
the families GGUF can hold (tasks.specs.GGUF_ARCHITECTURES). tests/flows/test_families.py checks
that the README holds exactly this table and that each cell is what the code does.

    python -m tasks.support     # prints the table
"""
from __future__ import annotations

__all__ = ["METHODS", "PACKED_FORMATS", "support_rows", "support_matrix_md"]

METHODS = ("rtn", "gptq", "boa", "recon", "+qat")
PACKED_FORMATS = ("gptq", "gptq_v2", "compressed-tensors")
_GGUF_NOTES = {"mistral": "yes (no sliding window)"}


def support_rows() -> list[tuple[str, dict[str, str]]]:
    """(model_type, {column: cell}) for every supported family, in the adapters' order."""
    from quantlib.adapters import FAMILIES

    from .specs import GGUF_ARCHITECTURES

    rows = []
    for family in FAMILIES:
        cells = dict.fromkeys((*METHODS, *PACKED_FORMATS), "yes")
        cells["gguf"] = _GGUF_NOTES.get(family, "yes") if family in GGUF_ARCHITECTURES else "no"
        rows.append((family, cells))
    return rows


def support_matrix_md() -> str:
    columns = (*METHODS, *PACKED_FORMATS, "gguf")
    heads = [("method: " if i == 0 else "format: " if i == len(METHODS) else "") + f"`{c}`"
             for i, c in enumerate(columns)]
    lines = ["| `model_type` | " + " | ".join(heads) + " |",
             "|---|" + "---|" * len(columns)]
    lines += [f"| `{family}` | " + " | ".join(cells[c] for c in columns) + " |" for family, cells in support_rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(support_matrix_md(), end="")
