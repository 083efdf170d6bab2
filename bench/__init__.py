"""gradflow benchmark suite: ``python -m bench`` (``--quick`` for a smoke run).

Every benchmark is a ratio measured in one run, after checking that the compared implementations
compute the same numbers:

1. hidden- and params-gradient maps vs a plain ``jax.grad`` of the same loss (the floor);
2. the hidden map vs the PyTorch way (eager ``nn.LSTMCell`` loop, ``retain_grad`` on every state);
3. the exact Jacobian map vs ``torch.func.jacrev`` + ``vmap``, vs ``H`` separate VJPs, and the
   ``k = 16`` probe estimate (error and time);
4. achieved FLOP/s of the map vs a large dense matmul in JAX;
5. scaling in ``L, T, H, B`` and peak memory of a 10,000-step map with checkpointing;

plus a sweep (cells x seeds) timed on 1 and 2 simulated CPU devices. Results go to
``bench/results/`` (``results.json``, ``results.md``, ``scaling.png``).
"""
