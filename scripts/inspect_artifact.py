"""What an artifact spends its bytes on: one row per tensor; the last line is one JSON object.

    python scripts/inspect_artifact.py runs/ID/final_model.golf
    python scripts/inspect_artifact.py model.golf --sort bytes --plot bytes.png

Columns: tensor, scheme, nominal bits per weight, shape, stored (uncompressed)
bytes, compressed bytes, bits per parameter after compression, share of the
16,000,000-byte budget, and the stream/codec holding its codes. A tensor's
compressed bytes are an attribution: each stream's real compressed size split
among its tensors in proportion to what each tensor's own bytes compress to
alone with that stream's codec (so the column sums to the payload exactly).
The header (config + tensor table) and the code bytes are listed separately.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from golfjax.cli import run_main


def nominal_bits(scheme: str, stored_dtype: str) -> int:
    """Bits per weight the scheme stores (before compression)."""
    match = re.match(r"^int(\d+)_", scheme)
    if match:
        return int(match.group(1))
    return {"passthrough_fp16": 16, "passthrough_fp32": 32}.get(scheme, 8 * _itemsize(stored_dtype))


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def array_entries(entry: dict) -> list[dict]:
    """Every stored byte range of a tensor (its arrays and their row permutations)."""
    out = []
    for spec in entry["arrays"].values():
        out.append(spec)
        if spec.get("row_perm"):
            out.append(spec["row_perm"])
    return out


def tensor_rows(header: dict, streams: dict[str, bytes], limit: int) -> list[dict]:
    from golfjax.export import codec

    stream_info = {s["name"]: s for s in header["streams"]}
    alone: dict[tuple[int, str], int] = {}
    for i, entry in enumerate(header["tensors"]):
        for spec in array_entries(entry):
            name = spec["stream"]
            raw = streams[name][spec["offset"] : spec["offset"] + spec["nbytes"]]
            alone[(i, name)] = alone.get((i, name), 0) + len(codec.compress(raw, stream_info[name]["codec"]))
    totals = {name: sum(v for (_, s), v in alone.items() if s == name) for name in stream_info}
    rows = []
    for i, entry in enumerate(header["tensors"]):
        params = 1
        for d in entry["shape"]:
            params *= d
        est = sum(stream_info[s]["compressed_bytes"] * v / max(totals[s], 1) for (j, s), v in alone.items() if j == i)
        main = max(array_entries(entry), key=lambda spec: spec["nbytes"])
        rows.append({
            "name": entry["name"], "scheme": entry["scheme"], "shape": entry["shape"], "params": params,
            "bits": nominal_bits(entry["scheme"], main["dtype"]),
            "stored_bytes": sum(spec["nbytes"] for spec in array_entries(entry)),
            "bytes": round(est), "bits_per_param": 8 * est / max(params, 1), "share": est / limit,
            "stream": main["stream"], "codec": stream_info[main["stream"]]["codec"],
        })
    return rows


def format_table(rows: list[dict]) -> list[str]:
    width = max([len(r["name"]) for r in rows] + [6])
    lines = [f"{'tensor':<{width}} {'scheme':<24} {'bits':>4} {'shape':<12} {'stored':>10} {'bytes':>10} "
             f"{'bits/p':>6} {'budget':>7}  stream:codec"]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) or "()"
        lines.append(f"{r['name']:<{width}} {r['scheme']:<24} {r['bits']:>4} {shape:<12} {r['stored_bytes']:>10} "
                     f"{r['bytes']:>10} {r['bits_per_param']:>6.2f} {100 * r['share']:>6.3f}%  "
                     f"{r['stream']}:{r['codec']}")
    return lines


def plot(rows: list[dict], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = sorted(rows, key=lambda r: -r["bytes"])[:40][::-1]
    bits = sorted({r["bits"] for r in shown})
    colors = {b: plt.get_cmap("viridis")(i / max(len(bits) - 1, 1)) for i, b in enumerate(bits)}
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.25 * len(shown)))
    ax.barh([r["name"] for r in shown], [r["bytes"] for r in shown], color=[colors[r["bits"]] for r in shown])
    from matplotlib.patches import Patch

    ax.set_xlabel("compressed bytes (attributed)")
    ax.set_title(title, fontsize=9)
    ax.legend(handles=[Patch(color=colors[b], label=f"{b}-bit") for b in bits], loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="a golfjax artifact (.golf)")
    parser.add_argument("--sort", choices=("order", "bytes"), default="order", help="row order (default: the file's)")
    parser.add_argument("--plot", metavar="PNG", help="also write a bar chart of bytes per tensor")
    args = parser.parse_args()

    from golfjax.config import from_dict
    from golfjax.export import artifact

    header, streams = artifact.read_streams(args.artifact)
    cfg = from_dict(header.get("config", {}))
    limit = cfg.export.artifact_limit_bytes
    rows = tensor_rows(header, streams, limit)
    if args.sort == "bytes":
        rows.sort(key=lambda r: -r["bytes"])
    model_bytes = Path(args.artifact).stat().st_size
    size = artifact.size_report(model_bytes, artifact.code_files(), limit, cfg.export.code_bytes_mode)
    overhead = model_bytes - header["payload"]["compressed_bytes"]
    for line in format_table(rows):
        print(line)
    for s in header["streams"]:
        print(f"stream:{s['name']} codec:{s['codec']} raw:{s['raw_bytes']} compressed:{s['compressed_bytes']}")
    print(f"container header+prefix: {overhead} bytes ({100 * overhead / limit:.3f}% of budget)")
    print(artifact.format_size_report(size, label=str(header.get("scheme", "")).replace("-", "+")))
    out = {"artifact": args.artifact, "scheme": header.get("scheme"), "codec": header.get("codec"),
           "model_bytes": model_bytes, "header_bytes": overhead, "code_bytes": size["code_bytes"],
           "total_bytes": size["total_bytes"], "limit_bytes": limit, "streams": header["streams"], "tensors": rows}
    if args.plot:
        out["plot"] = str(plot(rows, Path(args.plot), f"{args.artifact} ({header.get('scheme')}, {model_bytes} bytes)"))
        print(f"plot:{out['plot']}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    run_main(main)
