import math

import torch

from unimur.config import LossConfig
from unimur.model.model import UniMuROutput
from unimur.train.loss import UniMuRLoss, symmetric_infonce


def reference_infonce(a, b, s):
    """Plain-Python symmetric InfoNCE: mean over rows of -log softmax at the diagonal."""
    n = len(a)
    sim = [[s * sum(x * y for x, y in zip(a[i], b[j])) for j in range(n)] for i in range(n)]

    def ce(rows):
        return sum(-rows[i][i] + math.log(sum(math.exp(z) for z in rows[i])) for i in range(n)) / n

    cols = [[sim[j][i] for j in range(n)] for i in range(n)]
    return 0.5 * (ce(sim) + ce(cols))


def test_infonce_matches_hand_written_reference():
    a = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    b = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    s = torch.tensor(10.0)
    got = symmetric_infonce(a, b, s)
    want = reference_infonce(a.tolist(), b.tolist(), 10.0)
    assert abs(float(got) - want) < 1e-5


def test_total_is_weighted_sum_of_named_terms():
    torch.manual_seed(0)
    u, v, t = (torch.nn.functional.normalize(torch.randn(4, 8), dim=-1) for _ in range(3))
    out = UniMuROutput(u=u, v=v, t=t, caption_nll=torch.tensor(12.0), caption_tokens=torch.tensor(6),
                       logit_scale=torch.tensor(1 / 0.07), lm_nll=torch.tensor(3.0), lm_tokens=torch.tensor(3))
    w = LossConfig(l_cap=0.5, l_vm=2.0, l_tm=3.0, l_lm=0.25)
    terms = UniMuRLoss(w)(out)
    assert set(terms) == {"cap", "vm", "tm", "lm", "loss"}
    assert torch.isclose(terms["cap"], torch.tensor(2.0))  # 12 / 6 tokens
    assert torch.isclose(terms["lm"], torch.tensor(1.0))
    assert torch.isclose(terms["vm"], torch.tensor(reference_infonce(u.tolist(), v.tolist(), 1 / 0.07)))
    want = 0.5 * 2.0 + 2.0 * terms["vm"] + 3.0 * terms["tm"] + 0.25 * 1.0
    assert torch.isclose(terms["loss"], want)


def test_fromage_output_has_no_tm_term():
    u, v = torch.eye(3), torch.eye(3)
    out = UniMuROutput(u=u, v=v, t=None, caption_nll=torch.tensor(1.0), caption_tokens=torch.tensor(1),
                       logit_scale=torch.tensor(1.0))
    assert "tm" not in UniMuRLoss(LossConfig())(out)
