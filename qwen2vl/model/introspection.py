"""`output_hidden_states` / `output_attentions` of a forward: which ones a call asks for, and the attention
probabilities each layer records while asked (eager attention only: sdpa, flash and the CPU kernels never form
the probability matrix, so asking for it there is an error, not a silent None)."""
from __future__ import annotations

from contextlib import contextmanager


def output_flags(model, kwargs: dict) -> tuple[bool, bool]:
    """(want_hidden_states, want_attentions) from the call's kwargs (None → the config's value, default off)."""
    cfg = model.config

    def flag(name):
        value = kwargs.get(name)
        return bool(getattr(cfg, name, False) if value is None else value)

    want_hidden, want_attn = flag("output_hidden_states"), flag("output_attentions")
    if want_attn:
        impls = {layer.self_attn.attn_implementation for layer in model.layers}
        if impls != {"eager"}:
            raise ValueError(f"output_attentions=True needs attn_implementation='eager' (this model uses "
                             f"{sorted(impls)}, whose kernels never form the attention matrix); load with "
                             "attn_implementation='eager' or call model.set_attn_implementation('eager').")
    return want_hidden, want_attn


@contextmanager
def recording_attentions(layers, enabled: bool):
    """Yields the list each layer's attention appends its (B,Hq,S,K) probabilities to while `enabled`."""
    if not enabled:
        yield None
        return
    store: list = []
    for layer in layers:
        layer.self_attn.recorded_attentions = store
    try:
        yield store
    finally:
        for layer in layers:
            layer.self_attn.recorded_attentions = None
