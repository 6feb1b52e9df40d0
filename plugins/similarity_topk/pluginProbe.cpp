// plugin_probe LIB: load the plugin library the way TensorRT does (dlopen, setLoggerFinder,
// getCreators) and check its creator and plugin contract on the CPU. Prints one JSON object.
// Needs no TensorRT libraries and no GPU; enqueue is exercised by tests/gpu instead.
#include "NvInferRuntime.h"
#include "similarityTopKPlugin.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{
struct StderrLogger : ILogger
{
    void log(Severity, AsciiChar const* msg) noexcept override { std::fprintf(stderr, "[plugin] %s\n", msg); }
} gLogger;

struct Finder : ILoggerFinder
{
    ILogger* findLogger() override { return &gLogger; }
} gFinder;

std::string fieldType(PluginFieldType t)
{
    return t == PluginFieldType::kINT32 ? "int32" : t == PluginFieldType::kFLOAT32 ? "float32" : "other";
}

DynamicPluginTensorDesc desc(DataType type, std::vector<int64_t> dims)
{
    DynamicPluginTensorDesc d{};
    d.desc.type = type;
    d.desc.format = TensorFormat::kLINEAR;
    d.desc.dims.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i)
    {
        d.desc.dims.d[i] = dims[i];
    }
    d.min = d.max = d.opt = d.desc.dims;
    return d;
}
} // namespace

int main(int argc, char** argv)
{
    if (argc != 2)
    {
        std::fprintf(stderr, "usage: plugin_probe LIB\n");
        return 2;
    }
    void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
    {
        std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    if (getCreators == nullptr || setLoggerFinder == nullptr)
    {
        std::fprintf(stderr, "missing getCreators or setLoggerFinder\n");
        return 1;
    }
    setLoggerFinder(&gFinder);
    int32_t nbCreators = 0;
    IPluginCreatorInterface* const* creators = getCreators(nbCreators);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);

    std::printf("{\"creators\": %d, \"interface\": \"%s\", \"name\": \"%s\", \"version\": \"%s\", \"namespace\": \"%s\"",
        nbCreators, creator->getInterfaceInfo().kind, creator->getPluginName(), creator->getPluginVersion(),
        creator->getPluginNamespace());
    PluginFieldCollection const* names = creator->getFieldNames();
    std::printf(", \"fields\": {");
    for (int32_t i = 0; i < names->nbFields; ++i)
    {
        std::printf("%s\"%s\": \"%s\"", i ? ", " : "", names->fields[i].name, fieldType(names->fields[i].type).c_str());
    }
    std::printf("}");

    int32_t numProtected = 1, drop = 17, voteK = 3, badVoteK = 0;
    float tau = 0.6F, gamma = 7.5F;
    std::vector<PluginField> fields = {PluginField("num_protected", &numProtected, PluginFieldType::kINT32, 1),
        PluginField("drop", &drop, PluginFieldType::kINT32, 1), PluginField("tau", &tau, PluginFieldType::kFLOAT32, 1),
        PluginField("vote_k", &voteK, PluginFieldType::kINT32, 1),
        PluginField("gamma", &gamma, PluginFieldType::kFLOAT32, 1)};
    PluginFieldCollection fc{static_cast<int32_t>(fields.size()), fields.data()};
    IPluginV3* plugin = creator->createPlugin("probe", &fc, TensorRTPhase::kBUILD);
    fields[3].data = &badVoteK;
    IPluginV3* invalid = creator->createPlugin("probe", &fc, TensorRTPhase::kBUILD);
    fields[3].data = &voteK;
    std::printf(", \"created\": %s, \"rejects_vote_k_0\": %s", plugin ? "true" : "false", invalid ? "false" : "true");
    float nanTau = std::nanf("");
    fields[2].data = &nanTau;
    IPluginV3* nanPlugin = creator->createPlugin("probe", &fc, TensorRTPhase::kBUILD);
    fields[2].data = &tau;
    std::printf(", \"rejects_nan_tau\": %s", nanPlugin ? "false" : "true");
    delete nanPlugin;
    // Each field left out in turn, then each with the other type: every such node must be refused.
    std::printf(", \"rejects_missing\": {");
    for (size_t skip = 0; skip < fields.size(); ++skip)
    {
        std::vector<PluginField> partial;
        for (size_t i = 0; i < fields.size(); ++i)
        {
            if (i != skip)
            {
                partial.push_back(fields[i]);
            }
        }
        PluginFieldCollection missing{static_cast<int32_t>(partial.size()), partial.data()};
        std::vector<PluginField> retyped = partial;
        retyped.push_back(fields[skip]);
        retyped.back().type = fields[skip].type == PluginFieldType::kINT32 ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32;
        PluginFieldCollection wrongType{static_cast<int32_t>(retyped.size()), retyped.data()};
        IPluginV3* withoutField = creator->createPlugin("probe", &missing, TensorRTPhase::kBUILD);
        IPluginV3* withWrongType = creator->createPlugin("probe", &wrongType, TensorRTPhase::kBUILD);
        std::printf("%s\"%s\": %s", skip ? ", " : "", fields[skip].name,
            withoutField == nullptr && withWrongType == nullptr ? "true" : "false");
        delete withoutField;
        delete withWrongType;
    }
    std::printf("}, \"topk_limit\": %lld", static_cast<long long>(saint::kTopKLimit));
    if (plugin == nullptr)
    {
        std::printf("}\n");
        return 1;
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    IPluginV3* copy = plugin->clone();
    auto* runtime = static_cast<IPluginV3OneRuntime*>(copy->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    std::printf(", \"plugin_name\": \"%s\", \"outputs\": %d", core->getPluginName(), build->getNbOutputs());

    PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
    std::printf(", \"serialized\": {");
    for (int32_t i = 0; i < saved->nbFields; ++i)
    {
        PluginField const& f = saved->fields[i];
        if (f.type == PluginFieldType::kINT32)
        {
            std::printf("%s\"%s\": %d", i ? ", " : "", f.name, *static_cast<int32_t const*>(f.data));
        }
        else
        {
            std::printf("%s\"%s\": %g", i ? ", " : "", f.name, *static_cast<float const*>(f.data));
        }
    }
    std::printf("}");

    DataType in[1] = {DataType::kHALF};
    DataType out[2] = {DataType::kFLOAT, DataType::kFLOAT};
    int32_t typesStatus = build->getOutputDataTypes(out, 2, in, 1);
    std::printf(", \"output_types_int64\": %s", typesStatus == 0 && out[0] == DataType::kINT64 && out[1] == DataType::kINT64 ? "true" : "false");

    std::printf(", \"formats\": {");
    std::vector<std::pair<std::string, DataType>> inputTypes = {{"float32", DataType::kFLOAT}, {"float16", DataType::kHALF},
        {"bfloat16", DataType::kBF16}, {"int8", DataType::kINT8}, {"int32", DataType::kINT32}};
    for (size_t i = 0; i < inputTypes.size(); ++i)
    {
        DynamicPluginTensorDesc io[3] = {desc(inputTypes[i].second, {2, 197, 64}), desc(DataType::kINT64, {2, 180}),
            desc(DataType::kINT64, {2})};
        std::printf("%s\"%s\": %s", i ? ", " : "", inputTypes[i].first.c_str(), build->supportsFormatCombination(0, io, 1, 2) ? "true" : "false");
    }
    DynamicPluginTensorDesc io[3] = {desc(DataType::kFLOAT, {2, 197, 64}), desc(DataType::kINT32, {2, 180}), desc(DataType::kINT64, {2})};
    std::printf("}, \"int32_keep_index_rejected\": %s", build->supportsFormatCombination(1, io, 1, 2) ? "false" : "true");

    DynamicPluginTensorDesc good[1] = {desc(DataType::kFLOAT, {2, 197, 64})};
    DynamicPluginTensorDesc tooFew[1] = {desc(DataType::kFLOAT, {2, 30, 64})}; // 29 patches: at most 15 can go
    DynamicPluginTensorDesc outs[2] = {desc(DataType::kINT64, {2, 180}), desc(DataType::kINT64, {2})};
    std::printf(", \"configure_ok\": %s, \"configure_rejects_impossible_drop\": %s",
        build->configurePlugin(good, 1, outs, 2) == 0 ? "true" : "false",
        build->configurePlugin(tooFew, 1, outs, 2) != 0 ? "true" : "false");
    // A dynamic N: the build checks the profile's largest N against the limit, and each N is checked
    // again at run time (onShapeChange, enqueue), where a drop too large for it is refused.
    DynamicPluginTensorDesc dynamic[1] = {desc(DataType::kFLOAT, {2, 197, 64})};
    dynamic[0].desc.dims.d[1] = -1;
    dynamic[0].min.d[1] = 30;
    DynamicPluginTensorDesc pastLimit[1] = {dynamic[0]};
    pastLimit[0].max.d[1] = 7683; // ceil(7682 / 2) = 3841 A tokens
    PluginTensorDesc small[1] = {tooFew[0].desc};
    PluginTensorDesc fits[1] = {good[0].desc};
    PluginTensorDesc smallOuts[2] = {outs[0].desc, outs[1].desc};
    int64_t keepIndex = 0, voteRows = 0;
    void* outputs[2] = {&keepIndex, &voteRows};
    void const* inputs[1] = {nullptr};
    std::printf(", \"configure_dynamic_ok\": %s, \"configure_rejects_dynamic_past_limit\": %s",
        build->configurePlugin(dynamic, 1, outs, 2) == 0 ? "true" : "false",
        build->configurePlugin(pastLimit, 1, outs, 2) != 0 ? "true" : "false");
    std::printf(", \"shape_change_ok\": %s, \"shape_change_rejects_impossible_drop\": %s",
        runtime->onShapeChange(fits, 1, smallOuts, 2) == 0 ? "true" : "false",
        runtime->onShapeChange(small, 1, smallOuts, 2) != 0 ? "true" : "false");
    std::printf(", \"enqueue_rejects_impossible_drop\": %s",
        runtime->enqueue(small, smallOuts, inputs, outputs, nullptr, nullptr) != 0 && keepIndex == 0 ? "true" : "false");
    std::printf(", \"workspace_bytes\": %zu}\n", build->getWorkspaceSize(good, 1, outs, 2));
    delete copy;
    delete plugin;
    return 0;
}
