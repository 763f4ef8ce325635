"""Adapters (LoRA, LoCon, LoHa, LoKr, DoRA, DyLoRA, full; IA3/OFT/Tucker when loading), their kohya names, block
maths, apply/merge modes and the LoRA file. See network.py for the entry points."""

from lorakit.adapters.base import AdapterModule, attach, attached_adapters, detach
from lorakit.adapters.file import (LoraFile, build_metadata, check_family, detect_family, read_lora_file, save_lora,
                                   to_kohya)
from lorakit.adapters.loha import LoHaModule
from lorakit.adapters.lokr import LoKrModule
from lorakit.adapters.lora import DyLoRAModule, LoRAModule
from lorakit.adapters.network import (Network, NetworkConfig, build_network_from_state_dict, create_network,
                                      load_network, parse_network_args)
from lorakit.adapters.others import FullModule, IA3Module, OFTModule

__all__ = [
    "AdapterModule", "attach", "attached_adapters", "detach", "LoraFile", "build_metadata", "check_family",
    "detect_family", "read_lora_file", "save_lora", "to_kohya", "LoHaModule", "LoKrModule", "DyLoRAModule",
    "LoRAModule", "Network", "NetworkConfig", "build_network_from_state_dict", "create_network", "load_network",
    "parse_network_args", "FullModule", "IA3Module", "OFTModule",
]
