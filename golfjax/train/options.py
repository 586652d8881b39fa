"""Checks of the optimizer, schedule, averaging and data-order options (one clear message each)."""

from __future__ import annotations

from golfjax.config import Config, ConfigError
from golfjax.data.loader import ORDERS as DATA_ORDERS


def check_training_options(cfg: Config) -> None:
    o, t, d = cfg.optim, cfg.train, cfg.data
    from golfjax.optim.muon import NS_COEFFICIENTS

    if o.muon_ns_coeffs not in NS_COEFFICIENTS:
        raise ConfigError(f"optim.muon_ns_coeffs must be one of {', '.join(sorted(NS_COEFFICIENTS))}, "
                          f"got {o.muon_ns_coeffs!r}")
    if o.muon_ns_safety < 1.0:
        raise ConfigError(f"optim.muon_ns_safety must be >= 1 (it scales the starting norm up), got {o.muon_ns_safety}")
    for name in ("muon_wd", "embed_wd", "adam_wd", "head_wd"):
        if getattr(o, name) < 0:
            raise ConfigError(f"optim.{name} must be >= 0, got {getattr(o, name)}")
    if not 0.0 <= t.warmdown_frac <= 1.0:
        raise ConfigError(f"train.warmdown_frac must be in [0, 1] (0: the warmdown_iters rule), got {t.warmdown_frac}")
    if not 0.0 <= t.min_lr <= 1.0:
        raise ConfigError(f"train.min_lr must be in [0, 1], got {t.min_lr}")
    if t.gptq_reserve_seconds < 0 or (t.max_wallclock_seconds > 0 and t.gptq_reserve_seconds >= t.max_wallclock_seconds):
        raise ConfigError(f"train.gptq_reserve_seconds must be >= 0 and below max_wallclock_seconds, "
                          f"got {t.gptq_reserve_seconds}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1) (0: off), got {t.ema_decay}")
    if t.swa_every < 0:
        raise ConfigError(f"train.swa_every must be >= 0 (0: off), got {t.swa_every}")
    if d.data_order not in DATA_ORDERS:
        raise ConfigError(f"data.data_order must be one of {', '.join(DATA_ORDERS)}, got {d.data_order!r}")
