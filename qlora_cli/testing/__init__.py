"""Support for tests, the demo and the benchmarks: tiny random models and a character tokenizer built in code
(nothing downloaded). Not used by the commands themselves."""
