"""The engine: projections and how events fold into their rows, generations and their swap, the control tables, the
read models' tables and views, aggregates and snapshots, and the operations on them. No Temporal workflow code."""
