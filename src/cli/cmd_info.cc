// qcow2kit info: qemu-img info's output (human or JSON) for an image or its backing chain.
#include <memory>

#include "cli/commands.h"
#include "tools/info.h"
#include "tools/open_layer.h"

namespace qcow2kit::cli {
namespace {

struct InfoArgs {
  ImageOptions image;
  std::string output = "human";
  bool backing_chain = false;
};

int RunInfo(const Cli& cli, const InfoArgs& a) {
  auto open = ReadOnlyOpenOptions(a.image);
  if (!open.ok()) return Fail(open.status());
  auto reactor = MakeReactor(cli, a.image.engine);
  if (!reactor.ok()) return Fail(reactor.status());
  // Without --backing-chain only the image itself is opened, as qemu-img info does: a
  // missing backing file does not stop it from describing the image.
  auto img = (*reactor)->BlockOn(a.backing_chain ? tools::OpenImageChain(a.image.filename, *open)
                                                 : tools::OpenSingleLayer(a.image.filename, *open));
  if (!img.ok()) return Fail(img.status());

  tools::Json chain = tools::Json::array();
  for (FormatDriver* layer = img->get(); layer;
       layer = a.backing_chain ? layer->backing() : nullptr) {
    auto info = tools::ImageInfo(*layer);
    if (!info.ok())
      return Fail(
          info.status().WithContext("Could not get information about '" + layer->filename() + "'"));
    chain.push_back(std::move(*info));
  }

  std::string out;
  if (a.output == "json") {
    out = tools::QemuJsonPretty(a.backing_chain ? chain : chain[0]) + "\n";
  } else {
    for (size_t i = 0; i < chain.size(); ++i) {
      if (i > 0) out += "\n";
      out += tools::ImageInfoHuman(chain[i]);
    }
  }
  if (!WriteAll(stdout, out)) return Fail(Status::FromErrno(errno, "Could not write output"));
  return 0;
}

}  // namespace

void AddInfoCommand(Cli& cli) {
  auto a = std::make_shared<InfoArgs>();
  CLI::App* cmd = AddCommand(cli, "info", "Show information about an image (as qemu-img info)",
                             [&cli, a] { return RunInfo(cli, *a); });
  AddImageOptions(cmd, &a->image, /*with_cache=*/false);
  AddOutputOption(cmd, &a->output);
  cmd->add_flag("--backing-chain", a->backing_chain, "Describe every image of the backing chain");
}

}  // namespace qcow2kit::cli
