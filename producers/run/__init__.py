"""The trainer's run mechanics: `trainbus train` (``cli``, ``train``, ``resume``, ``progress``), the
Hugging Face callback that publishes events and obeys commands (``callback``, ``control_inbox``,
``hyperparams``, ``distributed``, ``exits``) and the run's publisher process (``publishing``,
``publisher``)."""
