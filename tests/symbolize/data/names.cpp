// C++ names to demangle: a method in a namespace and a template instance.
#include <cstdio>

namespace shapes {
struct Circle {
    __attribute__((noinline)) double area(double scale) const;
    double radius = 2.0;
};
double Circle::area(double scale) const { return 3.14159 * radius * radius * scale; }

template <typename T>
__attribute__((noinline)) T twice(T value) {
    return value + value;
}
}  // namespace shapes

int main(int argc, char **) {
    shapes::Circle circle;
    std::printf("%f %d\n", circle.area(argc), shapes::twice<int>(argc));
    return 0;
}
