#include "similarityTopKPlugin.h"

#include <cstring>
#include <exception>

using namespace nvinfer1;

namespace saint
{
namespace
{

ILoggerFinder* gLoggerFinder{nullptr};

bool isKeyType(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF || type == DataType::kBF16;
}

KeyType toKeyType(DataType type)
{
    return type == DataType::kHALF ? KeyType::kFLOAT16 : type == DataType::kBF16 ? KeyType::kBFLOAT16 : KeyType::kFLOAT32;
}

//! The attribute contract of docs/operator.md, checked once for every way a plugin is made.
bool validParams(SimilarityTopKParams const& p)
{
    std::string const problem = similarityTopKParamsProblem(p);
    if (!problem.empty())
    {
        logError(problem);
        return false;
    }
    return true;
}

//! The shape contract for `numTokens` (unknown, -1, at build time when N is dynamic: checked again
//! at run time by onShapeChange and enqueue).
bool validTokens(int64_t numTokens, SimilarityTopKParams const& p)
{
    std::string const problem = similarityTopKShapeProblem(numTokens, p);
    if (!problem.empty())
    {
        logError(problem);
        return false;
    }
    return true;
}

} // namespace

void setLoggerFinderImpl(ILoggerFinder* finder) noexcept
{
    gLoggerFinder = finder;
}

void logError(std::string const& message) noexcept
{
    ILogger* logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(ILogger::Severity::kERROR, message.c_str());
    }
}

SimilarityTopKPlugin::SimilarityTopKPlugin(SimilarityTopKParams params)
    : mParams(params)
{
}

IPluginCapability* SimilarityTopKPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* SimilarityTopKPlugin::clone() noexcept
{
    try
    {
        return new SimilarityTopKPlugin(mParams);
    }
    catch (std::exception const& e)
    {
        logError(std::string("SimilarityTopK: clone failed: ") + e.what());
        return nullptr;
    }
}

int32_t SimilarityTopKPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept
{
    if (nbInputs != 1 || nbOutputs != 2 || in[0].desc.dims.nbDims != 3)
    {
        logError("SimilarityTopK: expects one input keys [B, N, d] and two outputs");
        return -1;
    }
    int64_t const numTokens = in[0].desc.dims.d[1];
    if (numTokens >= 0)
    {
        return validTokens(numTokens, mParams) ? 0 : -1;
    }
    // Dynamic N: the largest N of the optimisation profile must fit the TopK limit; each N is
    // checked again when it is known.
    int64_t const largest = in[0].max.d[1];
    return largest < 0 || validTokens(largest, mParams) ? 0 : -1;
}

int32_t SimilarityTopKPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != 2 || nbInputs != 1 || !isKeyType(inputTypes[0]))
    {
        return -1;
    }
    outputTypes[0] = DataType::kINT64;
    outputTypes[1] = DataType::kINT64;
    return 0;
}

int32_t SimilarityTopKPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
    DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept
{
    if (nbInputs != 1 || nbOutputs != 2 || inputs[0].nbDims != 3)
    {
        return -1;
    }
    outputs[0].nbDims = 2;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = exprBuilder.operation(DimensionOperation::kSUB, *inputs[0].d[1], *exprBuilder.constant(mParams.drop));
    outputs[1].nbDims = 1;
    outputs[1].d[0] = inputs[0].d[0];
    return 0;
}

bool SimilarityTopKPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != 1 || nbOutputs != 2 || pos < 0 || pos > 2)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    return pos == 0 ? isKeyType(desc.type) : desc.type == DataType::kINT64;
}

size_t SimilarityTopKPlugin::getWorkspaceSize(
    DynamicPluginTensorDesc const* inputs, int32_t, DynamicPluginTensorDesc const*, int32_t) const noexcept
{
    return similarityTopKWorkspaceSize(
        static_cast<int32_t>(inputs[0].max.d[0]), static_cast<int32_t>(inputs[0].max.d[1]));
}

int32_t SimilarityTopKPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*,
    int32_t) noexcept
{
    return nbInputs == 1 && in[0].dims.nbDims == 3 && validTokens(in[0].dims.d[1], mParams) ? 0 : -1;
}

int32_t SimilarityTopKPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    Dims const& dims = inputDesc[0].dims;
    if (!validTokens(dims.d[1], mParams))
    {
        return -1;
    }
    cudaError_t const status = launchSimilarityTopK(inputs[0], toKeyType(inputDesc[0].type),
        static_cast<int64_t*>(outputs[0]), static_cast<int64_t*>(outputs[1]), workspace, static_cast<int32_t>(dims.d[0]),
        static_cast<int32_t>(dims.d[1]), static_cast<int32_t>(dims.d[2]), mParams, stream);
    if (status != cudaSuccess)
    {
        logError(std::string("SimilarityTopK: kernel launch failed: ") + cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

IPluginV3* SimilarityTopKPlugin::attachToContext(IPluginResourceContext*) noexcept
{
    return clone();
}

PluginFieldCollection const* SimilarityTopKPlugin::getFieldsToSerialize() noexcept
{
    mFields = {
        PluginField("num_protected", &mParams.numProtected, PluginFieldType::kINT32, 1),
        PluginField("drop", &mParams.drop, PluginFieldType::kINT32, 1),
        PluginField("tau", &mParams.tau, PluginFieldType::kFLOAT32, 1),
        PluginField("vote_k", &mParams.voteK, PluginFieldType::kINT32, 1),
        PluginField("gamma", &mParams.gamma, PluginFieldType::kFLOAT32, 1),
    };
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
    return &mFieldCollection;
}

SimilarityTopKCreator::SimilarityTopKCreator()
{
    mFields = {
        PluginField("num_protected", nullptr, PluginFieldType::kINT32, 1),
        PluginField("drop", nullptr, PluginFieldType::kINT32, 1),
        PluginField("tau", nullptr, PluginFieldType::kFLOAT32, 1),
        PluginField("vote_k", nullptr, PluginFieldType::kINT32, 1),
        PluginField("gamma", nullptr, PluginFieldType::kFLOAT32, 1),
    };
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

IPluginV3* SimilarityTopKCreator::createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept
{
    // Every field is required (saint_export/spec.py: ATTRIBUTES): a silently defaulted `drop` would
    // build an engine that prunes nothing, so a node that lacks one, or carries a mistyped one, is refused.
    SimilarityTopKParams params{};
    struct Required
    {
        char const* name;
        PluginFieldType type;
        void* target;
        bool seen;
    };
    Required required[] = {{"num_protected", PluginFieldType::kINT32, &params.numProtected, false},
        {"drop", PluginFieldType::kINT32, &params.drop, false}, {"tau", PluginFieldType::kFLOAT32, &params.tau, false},
        {"vote_k", PluginFieldType::kINT32, &params.voteK, false},
        {"gamma", PluginFieldType::kFLOAT32, &params.gamma, false}};
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
    {
        PluginField const& f = fc->fields[i];
        for (Required& r : required)
        {
            if (f.name != nullptr && std::strcmp(f.name, r.name) == 0 && f.type == r.type && f.data != nullptr && f.length >= 1)
            {
                std::memcpy(r.target, f.data, 4); // int32 and float32 alike
                r.seen = true;
            }
        }
    }
    for (Required const& r : required)
    {
        if (!r.seen)
        {
            logError(std::string("SimilarityTopK: the node lacks the required ")
                + (r.type == PluginFieldType::kINT32 ? "int32" : "float32") + " attribute '" + r.name + "'");
            return nullptr;
        }
    }
    if (!validParams(params))
    {
        return nullptr;
    }
    try
    {
        return new SimilarityTopKPlugin(params);
    }
    catch (std::exception const& e)
    {
        logError(std::string("SimilarityTopK: createPlugin failed: ") + e.what());
        return nullptr;
    }
}

} // namespace saint
