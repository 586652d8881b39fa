"""The reference baseline at full size (1.2244 BPB on 8xH100 in 600 s).

9 layers x 512, 8 heads / 4 KV heads, MLP 2x, vocab 1024, seq 1024,
524,288 tokens per step, 20,000 iterations capped at 600 s of training.
Every default of golfjax.config is this baseline, so the file only names it.
"""

from golfjax.config import Config


def get_config() -> Config:
    return Config()
