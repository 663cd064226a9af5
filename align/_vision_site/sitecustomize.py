"""Installs align.vision's torchvision shim in a process started to serve a vision-language model
(vLLM inspects model classes in a subprocess). Does nothing where torchvision is installed."""

try:
    from align.vision import torchvision_shim

    torchvision_shim()
except ImportError:  # not this toolkit's environment: leave the process as it is
    pass
