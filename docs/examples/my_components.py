"""A plugin: two components of my own, for `use "my_components.py"` in a recipe.

    adv=sign          +1 for a rollout whose reward beats 0.5, -1 otherwise
    mask=trust(eps)   keep a token while its ratio r = pi_theta/pi_old stays within
                      [1 - eps, 1 + eps], whatever the advantage's sign (a two-sided trust region)
"""

import torch

from hpt_dsl.plugin import component


@component("adv", "sign", meaning="+1 if the reward beats 0.5, else -1", formula="Â = sign(R − 0.5)")
def sign(inp):
    return torch.where(inp.rewards > 0.5, 1.0, -1.0).to(inp.rewards.dtype)


@component(
    "mask", "trust",
    meaning="a token contributes while its ratio r stays in [1 − eps, 1 + eps]",
    formula="𝟙[1 − eps ≤ r ≤ 1 + eps]",
    ranges={"eps": (0, 1)}, needs=("old_logprobs",), upge=True, zero_at_zero_adv=True,
)
def trust(t, lik, shape, eps):
    inside = (lik.rho >= 1 - eps) & (lik.rho <= 1 + eps)
    return torch.where(inside, shape(lik.x) * t.adv, (shape(lik.x) * t.adv).detach()), ~inside
