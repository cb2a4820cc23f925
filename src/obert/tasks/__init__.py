"""Tasks: text data loading, classification (models, evaluation), extractive question
answering (features, post-processing, SQuAD metrics) and masked-language modelling (upstream
pruning).

``TASKS`` maps a recipe's ``model.task_type`` to the module's ``build_task`` (see ``base.py``); a
new task is one module with a ``build_task`` and one entry here.
"""

from obert.tasks import classification, mlm, qa

TASKS = {"classification": classification.build_task, "question-answering": qa.build_task,
         "masked-lm": mlm.build_task}
