"""The paper's own numbers (Chen et al. 2023, Section 5), verbatim, in one place.

Every experiment that compares with the paper reads its figures from here and stores them in its JSON
beside ours, so a chapter can show "the paper | ours | our data" without typing a number.
"""

__all__ = ["PAPER", "IMAGENET_ARCHS", "DFMPC_SETTINGS"]

PAPER = {
    "table1": {  # CIFAR-10 top-1 %, FP32 / Original MP2/6 / DF-MPC MP2/6
        "ResNet18": {"fp32": 92.61, "original": 10.78, "dfmpc": 89.12},
        "ResNet56": {"fp32": 93.88, "original": 38.03, "dfmpc": 91.05},
        "VGG16": {"fp32": 93.70, "original": 10.00, "dfmpc": 90.48},
    },
    "table2": {  # CIFAR-100
        "ResNet18": {"fp32": 73.62, "original": 1.05, "dfmpc": 64.90},
        "VGG16": {"fp32": 70.09, "original": 3.80, "dfmpc": 64.95},
    },
    # ImageNet: (model, method, W-bit, size MB, top-1 %)
    "table3": [
        ("ResNet18", "Full-precision", "32", 44.59, 71.47), ("ResNet18", "OMSE", "4", 5.58, 64.03),
        ("ResNet18", "GZNQ", "4", 5.58, 64.50), ("ResNet18", "DFQ", "6", 8.36, 66.30),
        ("ResNet18", "DF-MPC", "2/6", 5.48, 66.46),
        ("ResNet50", "Full-precision", "32", 97.49, 76.12), ("ResNet50", "OCS", "4", 12.28, 69.30),
        ("ResNet50", "OMSE", "4", 12.28, 70.06), ("ResNet50", "DF-MPC", "2/6", 10.55, 71.20),
        ("ResNet101", "Full-precision", "32", 170.41, 77.31), ("ResNet101", "OMSE", "4", 21.30, 71.49),
        ("ResNet101", "DF-MPC", "2/6", 18.36, 72.59),
    ],
    "table4": [
        ("DenseNet121", "Full-precision", "32", 31.92, 74.36), ("DenseNet121", "OCS", "4", 4.09, 63.00),
        ("DenseNet121", "OMSE", "4", 4.09, 64.40), ("DenseNet121", "DF-MPC", "3/6", 3.39, 70.02),
        ("MobileNetV2", "Full-precision", "32", 13.37, 73.03), ("MobileNetV2", "GDFQ", "6", 2.50, 70.98),
        ("MobileNetV2", "GZNQ", "6", 2.50, 71.12), ("MobileNetV2", "DFQ", "8", 3.34, 71.20),
        ("MobileNetV2", "DF-MPC", "6", 2.50, 71.29),
    ],
    "fig3": {"model": "ResNet56", "dataset": "CIFAR-10", "bits": "2/6", "lambda1": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
             "lambda2": [0.0, 0.002, 0.004, 0.006, 0.008, 0.01], "best": {"lambda1": 0.5, "lambda2": 0.0},
             "claim": "accuracy rises steadily as lambda1 goes from 0.1 to 0.5 and drops at 0.6; it mainly "
                      "declines as lambda2 goes from 0 to 0.01; lambda1 = 0.5, lambda2 = 0 is best for ResNet56 "
                      "on CIFAR10"},
    "fig4": {"claim": "after compensation the mean of the 6-bit quantized weight distribution approaches zero",
             "layers": ["ResNet56 layer1-2", "ResNet56 layer3-8"]},
    "fig5": {"claim": "before compensation the loss landscape of the quantized model is sharp with no noticeable "
                      "convexity; after compensation it is smooth, flat and convex, like the full-precision "
                      "model's"},
    "timing": {"dfmpc_resnet18_s": 2.0, "dfmpc_device": "one GTX 1080 Ti", "zeroq_resnet18_s": 12.0,
               "zeroq_device": "an 8-V100 system",
               "claim": "DF-MPC of ResNet18 takes only 2 seconds on a single GTX 1080 Ti, or can even run on CPU "
                        "only; ZeroQ of ResNet18 takes 12 seconds on an 8-V100 system"},
}

# The paper's ImageNet architectures and the pytorchcv names of the same architectures.
IMAGENET_ARCHS = {"ResNet18": "resnet18", "ResNet50": "resnet50", "ResNet101": "resnet101",
                  "DenseNet121": "densenet121", "MobileNetV2": "mobilenetv2_w1"}

#: The paper's choice of the regularisation weights (Section 5.1), used wherever "DF-MPC" means the paper's method.
DFMPC_SETTINGS = {"lambda1": 0.5, "lambda2": 0.0}
