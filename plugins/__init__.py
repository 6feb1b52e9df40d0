"""TensorRT plugin sources (plugins/ in the repository), shipped with the package so installs can build them."""
