"""``opacus.accountants``: Opacus's accountant names over privgrad's accountants (see
``privgrad.opacus.accountants.accountant``)."""

from privgrad.opacus.accountants import utils
from privgrad.opacus.accountants.accountant import (
    GaussianAccountant,
    IAccountant,
    PRVAccountant,
    RDPAccountant,
    create_accountant,
)
from privgrad.opacus.accountants.utils import get_noise_multiplier

__all__ = ["GaussianAccountant", "IAccountant", "PRVAccountant", "RDPAccountant",
           "create_accountant", "get_noise_multiplier", "utils"]
