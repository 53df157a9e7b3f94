"""ECoFLaP's allocation on HF families: T5 encoder/decoder blocks and an instruction-reading Q-Former."""

from __future__ import annotations

import numpy as np
import pytest

from sparsevlm import hub
from sparsevlm.config import SparsitySpec
from sparsevlm.data.examples import load_examples
from sparsevlm.data.prompts import bundle_format
from sparsevlm.pruning import uniform_ratios
from sparsevlm.pruning.allocation import block_of
from sparsevlm.pruning.calibrate import calibration_carry
from sparsevlm.pruning.importance import allocation_ratios
from sparsevlm.tree import flatten


@pytest.mark.slow
def test_first_order_allocation_on_instructblip_flant5(hf_dirs):
    bundle = hub.load_model(str(hf_dirs("instructblip-flant5")))
    data = load_examples("shapes-captions", bundle.tokenizer, 8, 0, bundle.config.vision.image_size,
                           bundle_format(bundle.metadata), bundle.instruction_tokenizer, bundle.image_processor)
    carry = calibration_carry(data, 8, bundle.tokenizer.pad_token_id, bundle.config.vision, 0)
    assert "instruction_tokens" in carry
    spec = SparsitySpec(vision=0.5, connector=0.5, language=0.5)
    ratios = allocation_ratios("ecoflap-first", bundle.params, bundle.config, spec, carry)
    uniform = uniform_ratios(bundle.params, spec)
    flat = flatten(bundle.params)
    sizes = {p: int(np.prod(np.shape(flat[p]))) for p in uniform}
    assert set(ratios) == set(uniform)
    assert abs(sum(ratios[p] * sizes[p] for p in ratios) - 0.5 * sum(sizes.values())) <= 1.0
    blocks = {block_of(p) for p in ratios}
    assert {"language/encoder/blocks_0", "language/decoder/blocks_0"} <= blocks, sorted(blocks)
    assert len({round(r, 6) for r in ratios.values()}) > 1 and max(ratios.values()) <= 0.8 + 1e-12
