"""The CPU golf track's baseline: the reference architecture scaled to 2 CPU cores.

2 layers x 192 (4 heads, 1 KV head, MLP 2x), vocab 1024, seq 512, 8,192 tokens
per step, training capped at 600 s of wall-clock, artifact (model + code)
<= 1,000,000 bytes. Code bytes are counted the records' way
(export.code_bytes_mode="compressed": golfjax's .py files without comments and
docstrings, lzma-compressed; the size report labels it): the raw package
(~260 KB and growing) plus the ~0.8 MB int8+zlib model would not fit, while
the reference's single 47 KB train_gpt.py does. Every other setting is the reference's (iterations 20,000
as an upper bound, warmdown 1,200 iterations measured in wall-clock time,
grad_accum_steps 8 on one device, learning rates, Muon). The unchanged PyTorch
reference at this shape reaches about 2.66 BPB after its int8 round trip.

Build the track's data first (from the repository root; it checks the
shards' sha256s and refuses anything else):

    python scripts/prepare_data.py cpu-track --shared ../shared/data --out data/cpu_track

then train (paths are relative to the working directory):

    python scripts/train.py --config configs/cpu_track/baseline.py --set train.seed=1

Rules, results and the 3-seed commands: docs/CPU_TRACK.md.
"""

from dataclasses import replace

from golfjax.config import Config

TRACK_DIR = "data/cpu_track"
ARTIFACT_LIMIT_BYTES = 1_000_000


def get_config() -> Config:
    c = Config()
    return replace(
        c,
        model=replace(c.model, vocab_size=1024, num_layers=2, model_dim=192, num_heads=4, num_kv_heads=1,
                      mlp_mult=2.0),
        train=replace(c.train, train_seq_len=512, train_batch_tokens=8192, max_wallclock_seconds=600.0),
        data=replace(c.data, data_path=TRACK_DIR, tokenizer_path=f"{TRACK_DIR}/fineweb_1024_bpe.model"),
        export=replace(c.export, artifact_limit_bytes=ARTIFACT_LIMIT_BYTES, code_bytes_mode="compressed"),
    )
