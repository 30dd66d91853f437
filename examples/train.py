"""Train a small classifier on synthetic data on 2 CPU ranks with nbfabric's Fabric."""

import argparse

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from nbfabric import Fabric


def make_dataset(samples: int = 4096, features: int = 20, classes: int = 4) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, features, generator=generator) * 0.4
    labels = torch.randint(classes, (samples,), generator=generator)
    inputs = centers[labels] + torch.randn(samples, features, generator=generator)
    return TensorDataset(inputs, labels)


def train(fabric: Fabric, epochs: int) -> dict:
    fabric.seed_everything(42)
    dataset = make_dataset()
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=128, shuffle=True))
    for epoch in range(epochs):
        for inputs, labels in loader:
            loss = F.cross_entropy(model(inputs), labels)
            optimizer.zero_grad()
            fabric.backward(loss)
            optimizer.step()
        mean_loss = fabric.all_reduce(loss.detach(), reduce_op="mean").item()
        fabric.log("loss", mean_loss, step=epoch)
        fabric.print(f"epoch {epoch}: loss {mean_loss:.4f}")
    inputs, labels = dataset.tensors
    with torch.no_grad():
        accuracy = (model(fabric.to_device(inputs)).argmax(1).cpu() == labels).float().mean().item()
    return {"loss": mean_loss, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    fabric = Fabric(accelerator="cpu", devices=args.devices, precision=args.precision)
    result = fabric.launch(train, args.epochs)
    print(f"final loss {result['loss']:.4f}, accuracy {result['accuracy']:.3f}")


if __name__ == "__main__":
    main()
