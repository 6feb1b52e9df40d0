// Entry points of the plugin library.
// Dynamic loading (IPluginRegistry::loadLibrary, trtexec --dynamicPlugins, Polygraphy, Triton
// plugins=): getCreators + setLoggerFinder. Static registration (trtexec --staticPlugins,
// LD_PRELOAD) is the separate library built with SAINT_STATIC_REGISTRATION: TensorRT refuses
// loadLibrary for a library whose creators a static registrar already registered.
#include "similarityTopKPlugin.h"

#ifdef SAINT_STATIC_REGISTRATION
namespace
{
struct StaticLogger : nvinfer1::ILoggerFinder
{
    nvinfer1::ILogger* findLogger() override { return getLogger(); }
};
StaticLogger gStaticLogger;
struct SetStaticLogger
{
    SetStaticLogger() { saint::setLoggerFinderImpl(&gStaticLogger); }
} gSetStaticLogger;
} // namespace
using saint::SimilarityTopKCreator;
REGISTER_TENSORRT_PLUGIN(SimilarityTopKCreator);
#else
extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    saint::setLoggerFinderImpl(finder);
}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(
    int32_t& nbCreators)
{
    static saint::SimilarityTopKCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}
#endif
