"""gradflow: measure how gradients flow through deep stacks of recurrent cells.

The package reads bottom-up: ``cells`` -> ``Stack`` -> measurements (``jacobian``, ``gates``)
-> ``results`` -> ``plot`` / ``cli``; training (``tasks``, ``train``) sits beside them.
"""
from gradflow import cells, gates, jacobian, results, tasks, train
from gradflow.jacobian import gradient_map, jacobian_map, local_gains
from gradflow.problem import Problem, problem
from gradflow.results import Result, load
from gradflow.stack import Stack, StackOutput

__version__ = "0.1.0"

__all__ = ["cells", "gates", "jacobian", "results", "tasks", "train", "Stack", "StackOutput", "Problem", "problem",
           "gradient_map", "jacobian_map", "local_gains", "Result", "load", "__version__"]
