// qcow2kit dump: the qcow2 metadata (header, extensions, L1/L2 tables, refcounts, snapshots,
// bitmaps) as text or as one JSON object with a key per section.
#include <memory>

#include "cli/commands.h"
#include "image/qcow2_image.h"
#include "tools/dump.h"
#include "tools/open_layer.h"

namespace qcow2kit::cli {
namespace {

struct DumpArgs {
  ImageOptions image;
  std::string output = "human";
  bool header = false, extensions = false, l1 = false, l2 = false, refcounts = false,
       snapshots = false, bitmaps = false, all = false;
};

int RunDump(const Cli& cli, const DumpArgs& a) {
  auto open = ReadOnlyOpenOptions(a.image);
  if (!open.ok()) return Fail(open.status());
  auto reactor = MakeReactor(cli, a.image.engine);
  if (!reactor.ok()) return Fail(reactor.status());
  auto img = (*reactor)->BlockOn(tools::OpenSingleLayer(a.image.filename, *open));
  if (!img.ok()) return Fail(img.status());
  auto* q = dynamic_cast<Qcow2Image*>(img->get());
  if (!q) {
    return Fail("'" + a.image.filename + "' is not a qcow2 image (format " + (*img)->format_name() +
                ")");
  }

  const bool any =
      a.header || a.extensions || a.l1 || a.l2 || a.refcounts || a.snapshots || a.bitmaps;
  const bool all = a.all;
  tools::Json doc = tools::Json::object();
  if (all || a.header || !any) doc["header"] = tools::DumpHeader(*q);
  if (all || a.extensions) doc["extensions"] = tools::DumpExtensions(*q);
  if (all || a.l1) doc["l1"] = tools::DumpL1(*q);
  if (all || a.l2) {
    auto l2 = (*reactor)->BlockOn(tools::DumpL2(*q));
    if (!l2.ok()) return Fail(l2.status().WithContext("'" + a.image.filename + "'"));
    doc["l2"] = std::move(*l2);
  }
  if (all || a.refcounts) {
    auto rc = (*reactor)->BlockOn(tools::DumpRefcounts(*q));
    if (!rc.ok()) return Fail(rc.status().WithContext("'" + a.image.filename + "'"));
    doc["refcounts"] = std::move(*rc);
  }
  if (all || a.snapshots) doc["snapshots"] = tools::DumpSnapshots(*q);
  if (all || a.bitmaps) doc["bitmaps"] = tools::DumpBitmaps(*q);

  std::string out;
  if (a.output == "json") {
    out = tools::JsonDump(doc) + "\n";
  } else {
    bool first = true;
    for (auto it = doc.begin(); it != doc.end(); ++it) {
      if (!first) out += "\n";
      first = false;
      out += tools::DumpSectionText(it.key(), it.value());
    }
  }
  if (!WriteAll(stdout, out)) return Fail(Status::FromErrno(errno, "Could not write output"));
  return 0;
}

}  // namespace

void AddDumpCommand(Cli& cli) {
  auto a = std::make_shared<DumpArgs>();
  CLI::App* cmd = AddCommand(cli, "dump", "Show the qcow2 metadata of an image (default: header)",
                             [&cli, a] { return RunDump(cli, *a); });
  AddImageOptions(cmd, &a->image, /*with_cache=*/false);
  AddOutputOption(cmd, &a->output);
  cmd->add_flag("--header", a->header, "The header fields");
  cmd->add_flag("--extensions", a->extensions, "The header extensions");
  cmd->add_flag("--l1", a->l1, "The active L1 table");
  cmd->add_flag("--l2", a->l2, "The L2 tables of the active L1 table");
  cmd->add_flag("--refcounts", a->refcounts, "The refcount table and refcounts");
  cmd->add_flag("--snapshots", a->snapshots, "The snapshot table");
  cmd->add_flag("--bitmaps", a->bitmaps, "The bitmap directory");
  cmd->add_flag("--all", a->all, "Every section");
}

}  // namespace qcow2kit::cli
