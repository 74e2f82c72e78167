"""gradest: gradient estimators for mixture-of-experts routing, measured against the exact gradient."""

from gradest.errors import GradestError
from gradest.estimators import Estimator, Routing, estimator_names, get_estimator
from gradest.measure import bias_variance, compare, exact_gradient, gradient_samples
from gradest.problems import ProblemConfig, make_problem

__version__ = "0.1.0"
__all__ = ["GradestError", "Estimator", "Routing", "estimator_names", "get_estimator", "bias_variance", "compare",
           "exact_gradient", "gradient_samples", "ProblemConfig", "make_problem", "__version__"]
