"""CoRA: LoRA adapters whose ``lora_B`` is a common subspace of several models.

The pipeline, one module per stage::

    checkpoints --sources--> q/k/v weights --decompose--> Basis (basis.py, file)
        --adapters--> PEFT LoRA model --training--> adapter --evaluation--> metrics
"""

__version__ = "0.1.0"
