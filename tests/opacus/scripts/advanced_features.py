"""Opacus tutorial ``intro_to_advanced_features.ipynb``, its code cells in order (Apache-2.0,
Meta Platforms), for privgrad's tests: only the imports from ``opacus`` changed.

Stand-ins (marked): the cells that display images (IPython) are left out, and so is
``warnings.simplefilter("ignore")`` (the tests treat warnings as errors). Cell 21 raises on
purpose (the notebook shows its error); here the error is kept in ``second_backward_error`` so
that the cells after it run.
"""

# %% [cell 4]
import torch
from torch import nn
from torch.utils.data import TensorDataset, DataLoader


class SampleNet(nn.Module):

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        x = self.fc1(x)
        x = self.fc2(x)
        return x

DATASET = TensorDataset(torch.randn(100, 16), torch.randint(0,2, (100,)))

# %% [cell 9]
from privgrad.opacus import PrivacyEngine  # was: from opacus import PrivacyEngine

privacy_engine = PrivacyEngine()

model = SampleNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data_loader = DataLoader(DATASET, batch_size=10)

print(
    f"Before make_private(). "
    f"Model:{type(model)}, Optimizer:{type(optimizer)}, DataLoader:{type(data_loader)}"
)

model, optimizer, data_loader = privacy_engine.make_private(
    module=model,
    optimizer=optimizer,
    data_loader=data_loader,
    max_grad_norm=1.0,
    noise_multiplier=1.0,
)

print("="*20)

print(
    f"After make_private(). "
    f"Model:{type(model)}, Optimizer:{type(optimizer)}, DataLoader:{type(data_loader)}"
)

# %% [cell 13]
model = SampleNet()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
data_loader = DataLoader(DATASET, batch_size=10)

# %% [cell 17]
from privgrad.opacus import GradSampleModule  # was: from opacus import GradSampleModule

model = GradSampleModule(model)
model

# %% [cell 19]
# take a fake training step
y = model(torch.randn(10, 16))
y.sum().backward()

# inspect gradient values
grad = model.fc1.weight.grad
grad_sample = model.fc1.weight.grad_sample

print("grad.shape: ", grad.shape)
print("grad_sample.shape: ", grad_sample.shape)

grad_sample_aggregated = grad_sample.mean(dim=0)
print("Average grad_sample over 1st dimension. Equal to original: ", torch.allclose(grad, grad_sample_aggregated))

model.zero_grad()

# %% [cell 21]
from privgrad.opacus.privacy_engine import forbid_accumulation_hook  # was: opacus.privacy_engine

model.register_forward_pre_hook(forbid_accumulation_hook)

# first backward should work fine
model(torch.randn(10, 16)).sum().backward()
print("First backward successful")

# second should fail
try:  # stand-in: (the notebook shows this cell's error)
    model(torch.randn(10, 16)).sum().backward()
except Exception as e:  # stand-in
    second_backward_error = e  # stand-in

model.zero_grad()

# %% [cell 24]
from privgrad.opacus.data_loader import DPDataLoader  # was: from opacus.data_loader import ...

dp_data_loader = DPDataLoader.from_data_loader(data_loader, distributed=False)

print("Is dataset the same: ", dp_data_loader.dataset == data_loader.dataset)
print(f"DPDataLoader length: {len(dp_data_loader)}, original: {len(data_loader)}")
print("DPDataLoader sampler: ", dp_data_loader.batch_sampler)

data_loader = dp_data_loader

# %% [cell 26]
batch_sizes = []
for x,y in dp_data_loader:
    batch_sizes.append(len(x))

print("Batch sizes sampled:", batch_sizes)

# %% [cell 29]
from privgrad.opacus.optimizers import DPOptimizer  # was: from opacus.optimizers import ...

sample_rate = 1 / len(data_loader)
expected_batch_size = int(len(data_loader.dataset) * sample_rate)

optimizer = DPOptimizer(
    optimizer=optimizer,
    noise_multiplier=1.0,
    max_grad_norm=1.0,
    expected_batch_size=expected_batch_size,
)

# %% [cell 32]
from privgrad.opacus.accountants import RDPAccountant  # was: from opacus.accountants import ...

accountant = RDPAccountant()
optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))

# %% [cell 40]
from privgrad.opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed  # was: opacus...
from torch.distributions.laplace import Laplace

class LaplaceDPOptimizer(DPOptimizer):

    def add_noise(self):
        laplace = Laplace(loc=0, scale=self.noise_multiplier * self.max_grad_norm)
        for p in self.params:
            _check_processed_flag(p.summed_grad)

            noise = laplace.sample(p.summed_grad.shape)
            p.grad = p.summed_grad + noise

            _mark_as_processed(p.summed_grad)
