"""A small Llama-shaped model through ``torch.compile(model, backend="int8lt")``.

Runs in seconds on a CPU and prints what the backend did and how close it is to fp32.
"""

import torch
from toy_models import LlamaConfig, TinyLlama

import int8fx
from int8fx import reference


def main() -> None:
    torch.manual_seed(0)
    # Random weights plus three hidden dimensions carrying large magnitudes (outlier features).
    model = TinyLlama(LlamaConfig(dim=128, hidden=256, layers=2, outlier_dims=(3, 17, 40))).eval()
    tokens = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        fp32 = model(tokens)
        for threshold in (6.0, 0.0):
            torch._dynamo.reset()
            backend = int8fx.int8lt(threshold=threshold)
            out = torch.compile(model, backend=backend)(tokens)
            report = backend.reports[0]
            print(
                f"threshold {threshold}: SQNR vs fp32 {reference.sqnr_db(fp32, out):5.1f} dB, "
                f"{len(report.replaced)} linears in int8, {len(report.skipped)} kept in fp"
            )
    for layer in report.layers:
        print(f"  {layer.module_path:32s} {str(layer.shape):12s} {layer.action:4s} {layer.reason}")


if __name__ == "__main__":
    main()
