"""SAE / transcoder trainers, one file per architecture behind one interface.

    SAETrainer(TrainerConfig(arch=..., d_in=..., d_sae=...), SAEConfig(...))

returns the trainer for cfg.arch; every trainer has `step(x, y=None)`, `to_jumprelu()` (an exact
JumpReLUSAE in model units), `state_dict()` / `load_state_dict()` (exact resume),
`set_normalisation()`, `dead_mask()`, `encode()` / `decode()` (inference, model units).

    gated       Gated SAE + ghost grads (the paper's App. B recipe)          gated.py
    relu        ReLU SAE, decoder-norm-weighted L1 (Conerly et al. 2024)     relu.py
    topk        TopK + AuxK (Gao et al. 2024)                                topk.py
    batchtopk   BatchTopK + AuxK, global threshold (Bussmann et al. 2024)     batchtopk.py
    jumprelu    JumpReLU, L0 penalty via STEs (Rajamanoharan et al. 2024)    jumprelu.py
    matryoshka  Matryoshka BatchTopK (Bussmann et al. 2025)                  matryoshka.py

Shared machinery (normalisation, centring, dead tracking, NaN safety, checkpoints) is in base.py;
the TopK family decodes sparsely (`icl_circuits.sae.sparse`).
"""

from icl_circuits.sae.trainers.base import SAETrainer
from icl_circuits.sae.trainers.config import ARCHS, DEFAULT_L0_PER_DIM, DEFAULT_L1, TOPK_FAMILY, TrainerConfig
from icl_circuits.sae.trainers.batchtopk import BatchTopKTrainer
from icl_circuits.sae.trainers.gated import GatedTrainer
from icl_circuits.sae.trainers.jumprelu import JumpReLUTrainer
from icl_circuits.sae.trainers.matryoshka import MatryoshkaTrainer
from icl_circuits.sae.trainers.relu import ReLUTrainer
from icl_circuits.sae.trainers.topk import TopKTrainer, auxk_loss

__all__ = [
    "ARCHS", "DEFAULT_L0_PER_DIM", "DEFAULT_L1", "TOPK_FAMILY", "SAETrainer", "TrainerConfig", "BatchTopKTrainer",
    "GatedTrainer", "JumpReLUTrainer", "MatryoshkaTrainer", "ReLUTrainer", "TopKTrainer", "auxk_loss",
]  # fmt: skip
