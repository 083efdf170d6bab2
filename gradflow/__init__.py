"""gradflow: measure how gradients flow through deep stacks of recurrent cells."""
from gradflow import cells
from gradflow.stack import Stack, StackOutput

__version__ = "0.1.0"

__all__ = ["cells", "Stack", "StackOutput", "__version__"]
