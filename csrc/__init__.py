"""The C++ and CUDA sources of dynrobust's operators, installed as package data
(``robustbench_dyn._csrc``) so that ``dynrobust ops build`` works from a wheel too."""
