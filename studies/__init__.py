"""The project's own experiments: reports and figures over runs that benchmarks/ scripts produce.

Nothing here is part of the library a user imports (``tolgate``, ``tolgate_flows``); each module
reads run folders or result JSON and writes a report, a table or a figure.
"""
