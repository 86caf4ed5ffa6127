"""Opacus tutorial ``building_image_classifier.ipynb``, its code cells in order (Apache-2.0,
Meta Platforms), for privgrad's tests: only the imports from ``opacus`` changed.

Stand-ins (marked): CIFAR10 -> learnable random images, torchvision's ``resnet18`` -> a small
ResNet-style network that keeps its ``BatchNorm2d`` layers (so the validator has work to do),
smaller sizes and epochs, ``tqdm.notebook`` -> ``tqdm``, and no ``warnings.simplefilter
("ignore")`` (the tests treat warnings as errors).
"""

# %% [cell 5]
MAX_GRAD_NORM = 1.2
EPSILON = 50.0
DELTA = 1e-5
EPOCHS = 2  # stand-in: 20

LR = 1e-3

# %% [cell 7]
BATCH_SIZE = 64  # stand-in: 512
MAX_PHYSICAL_BATCH_SIZE = 16  # stand-in: 128

# %% [cells 10, 12] stand-in: torchvision's CIFAR10 with its transforms
import torch

from tests.opacus.conftest import stand_in_images, small_resnet

train_dataset = stand_in_images(256, (3, 32, 32), seed=1)

train_loader = torch.utils.data.DataLoader(
    train_dataset,
    batch_size=BATCH_SIZE,
)

test_dataset = stand_in_images(64, (3, 32, 32), seed=2)

test_loader = torch.utils.data.DataLoader(
    test_dataset,
    batch_size=BATCH_SIZE,
    shuffle=False,
)

# %% [cell 14] stand-in: models.resnet18(num_classes=10)
model = small_resnet(num_classes=10)

# %% [cell 16]
from privgrad.opacus.validators import ModuleValidator  # was: from opacus.validators import ...

errors = ModuleValidator.validate(model, strict=False)
errors[-5:]

# %% [cell 18]
model = ModuleValidator.fix(model)
ModuleValidator.validate(model, strict=False)

# %% [cell 20]
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

model = model.to(device)

# %% [cell 22]
import torch.nn as nn
import torch.optim as optim

criterion = nn.CrossEntropyLoss()
optimizer = optim.RMSprop(model.parameters(), lr=LR)


# %% [cell 25]
def accuracy(preds, labels):
    return (preds == labels).mean()


# %% [cell 27]
from privgrad.opacus import PrivacyEngine  # was: from opacus import PrivacyEngine

privacy_engine = PrivacyEngine()

model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
    module=model,
    optimizer=optimizer,
    data_loader=train_loader,
    epochs=EPOCHS,
    target_epsilon=EPSILON,
    target_delta=DELTA,
    max_grad_norm=MAX_GRAD_NORM,
)

print(f"Using sigma={optimizer.noise_multiplier} and C={MAX_GRAD_NORM}")

# %% [cell 29]
import numpy as np
from privgrad.opacus.utils.batch_memory_manager import BatchMemoryManager  # was: opacus.utils...


def train(model, train_loader, optimizer, epoch, device):
    model.train()
    criterion = nn.CrossEntropyLoss()

    losses = []
    top1_acc = []

    with BatchMemoryManager(
        data_loader=train_loader,
        max_physical_batch_size=MAX_PHYSICAL_BATCH_SIZE,
        optimizer=optimizer
    ) as memory_safe_data_loader:

        for i, (images, target) in enumerate(memory_safe_data_loader):
            optimizer.zero_grad()
            images = images.to(device)
            target = target.to(device)

            # compute output
            output = model(images)
            loss = criterion(output, target)

            preds = np.argmax(output.detach().cpu().numpy(), axis=1)
            labels = target.detach().cpu().numpy()

            # measure accuracy and record loss
            acc = accuracy(preds, labels)

            losses.append(loss.item())
            top1_acc.append(acc)

            loss.backward()
            optimizer.step()

            if (i+1) % 200 == 0:
                epsilon = privacy_engine.get_epsilon(DELTA)
                print(
                    f"\tTrain Epoch: {epoch} \t"
                    f"Loss: {np.mean(losses):.6f} "
                    f"Acc@1: {np.mean(top1_acc) * 100:.6f} "
                    f"(ε = {epsilon:.2f}, δ = {DELTA})"
                )


# %% [cell 31]
def test(model, test_loader, device):
    model.eval()
    criterion = nn.CrossEntropyLoss()
    losses = []
    top1_acc = []

    with torch.no_grad():
        for images, target in test_loader:
            images = images.to(device)
            target = target.to(device)

            output = model(images)
            loss = criterion(output, target)
            preds = np.argmax(output.detach().cpu().numpy(), axis=1)
            labels = target.detach().cpu().numpy()
            acc = accuracy(preds, labels)

            losses.append(loss.item())
            top1_acc.append(acc)

    top1_avg = np.mean(top1_acc)

    print(
        f"\tTest set:"
        f"Loss: {np.mean(losses):.6f} "
        f"Acc: {top1_avg * 100:.6f} "
    )
    return np.mean(top1_acc)


# %% [cell 33]
from tqdm import tqdm  # stand-in: from tqdm.notebook import tqdm

for epoch in tqdm(range(EPOCHS), desc="Epoch", unit="epoch"):
    train(model, train_loader, optimizer, epoch + 1, device)

# %% [cell 35]
top1_acc = test(model, test_loader, device)
