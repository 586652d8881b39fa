"""A tiny model that trains, exports and scores in a few minutes on 2 CPU cores.

With no data path it builds an offline corpus (Python standard-library
docstrings) and a 512-piece tokenizer. To run it on real FineWeb text instead:

    python scripts/prepare_data.py text ../shared/data/fineweb/fineweb_challenge_docs_200.jsonl \
        --tokenizer ../shared/data/tokenizers/fineweb_1024_bpe.model --num-val-docs 20 --out data/fineweb200
    python scripts/train.py --config configs/smoke.py --set data.data_path=data/fineweb200 \
        --set data.tokenizer_path=../shared/data/tokenizers/fineweb_1024_bpe.model --set model.vocab_size=1024
"""

from dataclasses import replace

from golfjax.config import Config


def get_config() -> Config:
    c = Config()
    return replace(
        c,
        model=replace(c.model, vocab_size=512, num_layers=2, model_dim=128, num_heads=4, num_kv_heads=2),
        train=replace(
            c.train, iterations=150, warmdown_iters=50, train_batch_tokens=8192, train_seq_len=256,
            max_wallclock_seconds=300.0, val_loss_every=50, train_log_every=25,
        ),
        optim=replace(c.optim, muon_momentum_warmup_steps=50),
        eval=replace(c.eval, val_batch_size=65536),
        data=replace(c.data, data_path="", tokenizer_path=""),
    )
