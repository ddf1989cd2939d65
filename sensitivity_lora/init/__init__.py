"""LoRA initialisers computed from calibration statistics, never from a second forward pass.

Every function takes plain tensors: per input group the raw sums of one calibration pass,
``{group: GroupSums(xtx=Σxxᵀ, total=Σx, n_tokens=n, members=(module, ...))}`` (or plain
4-tuples; :func:`group_sums_from_statistics` reads them off ``sensitivity_lora.calibrate(...,
hessian="full")``). One decomposition per input group is shared by its members.

    eva_init(groups, r, rho)                  PEFT EVA's ranks and A, exactly (eva.py)
    covariance_init(groups, ranks)            A = top covariance directions for given ranks (with_ranks.py)
    output_aware_init(weights, groups, r̄)    ranks and A from the spectrum of W·M (output_aware.py)
    newton_init(gradients, groups, r̄)        ranks and A from the labelled gradient whitened by H (newton.py)
    to_eva_state_dict(result)                 → peft.tuners.lora.eva.initialize_lora_eva_weights (state.py)
    write_corda_covariance_file(path, groups) → peft CordaConfig(covariance_file=path) (corda.py)

Building blocks: :func:`centred_covariance`, :func:`second_moment`, :func:`default_gain_rows` (covariance.py),
:func:`top_eigenpairs` with the sign convention :func:`fix_signs` (decompose.py),
:func:`greedy_ranks` (budget.py), :func:`alpha_pattern` (PEFT's adjust_scaling_factors).

This subpackage imports nothing else of sensitivity_lora (only torch; scipy for the Lanczos solver).
"""
from __future__ import annotations

from .budget import greedy_ranks
from .corda import corda_covariances, write_corda_covariance_file
from .covariance import centred_covariance, default_gain_rows, second_moment
from .decompose import Eigenpairs, choose_method, fix_signs, top_eigenpairs
from .eva import eva_init
from .newton import newton_init
from .output_aware import output_aware_init
from .pca import GroupPCA, group_pca
from .state import (PEFT_MODEL_PREFIX, GroupSums, InitResult, alpha_pattern, as_group_sums,
                    group_sums_from_statistics, to_eva_state_dict)
from .with_ranks import covariance_init

__all__ = [
    "PEFT_MODEL_PREFIX", "Eigenpairs", "GroupPCA", "GroupSums", "InitResult", "alpha_pattern", "as_group_sums",
    "centred_covariance", "choose_method", "corda_covariances", "covariance_init", "default_gain_rows", "eva_init",
    "fix_signs",
    "greedy_ranks", "group_pca", "group_sums_from_statistics", "newton_init", "output_aware_init", "second_moment",
    "to_eva_state_dict", "top_eigenpairs", "write_corda_covariance_file",
]
