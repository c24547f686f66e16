"""A plain CNN (conv, batch norm, linear head) with (image, label) tuple batches."""
import torch

class CNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(32)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.fc = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc(x)))

def build_model():
    torch.manual_seed(0)
    return CNN()

def example_inputs():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

def train_data():
    for i in range(4):
        yield torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i)), torch.arange(8) % 10
