"""Privacy: what fedseg protects, how it is accounted, and how it is checked empirically.

Modules
-------
dpsgd
    Sample-level DP at a site (``dp-mode sample``): DP-SGD with Opacus and its RDP accountant.
client_dp
    Client-level DP at the server (``dp-mode client``): update clipping, Gaussian noise and the
    server's accountant (:class:`~fedseg.privacy.client_dp.ServerPrivacy`).
ledger
    The per-site epsilon ledger kept in the checkpoint and every history row.
mia
    The membership-inference audit of a trained model (loss-threshold attack).

Opacus is imported where it is used, so a run without DP does not load it.
"""
