"""A CaseOps training run counts the ORIGINAL text's bytes in every BPB it prints.

The byte tables of a CaseOps tokenizer count the case operators' own UTF-8
bytes (3 each), so the run's periodic validation and its round-trip line
must read the byte sidecar instead (as the Evaluator does).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace

import numpy as np

from conftest import FINEWEB_DOCS, require
from golfjax.config import Config
from golfjax.data import caseops as co
from golfjax.data import prepare
from golfjax.data.shards import read_shard
from golfjax.data.tokenizer import build_byte_tables, load_tokenizer
from golfjax.eval import bpb
from golfjax.train.loop import run


def test_caseops_run_counts_original_bytes(tmp_path):
    with open(require(FINEWEB_DOCS), encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()][:40]
    tok_path = prepare.train_caseops_tokenizer(docs, 512, tmp_path / "caseops_512")
    sp = load_tokenizer(tok_path)
    data = tmp_path / "data"
    prepare.tokenize_caseops_to_shards(docs, sp, data, num_val_docs=6, progress=False)

    c = Config()
    seq = 32
    cfg = replace(
        c,
        model=replace(c.model, vocab_size=512, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1,
                      compute_dtype="float32"),
        train=replace(c.train, iterations=1, train_batch_tokens=256, train_seq_len=seq, val_loss_every=0,
                      train_log_every=1, max_wallclock_seconds=0.0, out_dir=str(tmp_path), run_id="caseops"),
        eval=replace(c.eval, val_batch_size=8192),
        data=replace(c.data, data_path=str(data), tokenizer_path=str(tok_path), val_pattern=co.VAL_TOKEN_PATTERN),
        caseops=replace(c.caseops, caseops_enabled=True),
    )
    run(cfg, console=io.StringIO())

    val = np.concatenate([np.asarray(read_shard(p)) for p in sorted(data.glob(co.VAL_TOKEN_PATTERN))])
    n = (len(val) - 1) // seq * seq  # the plain evaluator's scored targets: positions 1..n
    side = co.evaluation_bytes(cfg, val)
    want = bpb.sidecar_count_bytes(side, np.arange(1, n + 1))
    lut = bpb.count_bytes(val[:n], val[1 : n + 1], build_byte_tables(sp, 512))
    assert lut > want  # the byte tables would overcount: this test can tell them apart

    events = [json.loads(line) for line in (tmp_path / "caseops" / "metrics.jsonl").read_text().splitlines()]
    vals = [e for e in events if e["event"] == "val"]
    final = events[-1]
    assert vals and all(e["bytes"] == want and e["tokens"] == n for e in vals)
    assert final["event"] == "final" and final["roundtrip_bytes"] == want
    for e in vals:
        assert math.isclose(e["val_bpb"], e["val_loss"] / math.log(2) * n / want, rel_tol=1e-12)
