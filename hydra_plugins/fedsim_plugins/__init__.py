"""fedsim's Hydra plugins: the sweeper (``hydra/sweeper=fedsim``: product sweeps plus named
variants, resumable, failures counted) and the launcher (``hydra/launcher=ray``: the jobs of a
sweep run concurrently as Ray tasks on the cluster). ``hydra_plugins`` is Hydra's namespace
package for plugins; Hydra imports this module when it looks for plugins."""

from hydra.core.config_store import ConfigStore

from hydra_plugins.fedsim_plugins.config import RayLauncherConf, SweeperConf

ConfigStore.instance().store(group="hydra/sweeper", name="fedsim", node=SweeperConf, provider="fedsim")
ConfigStore.instance().store(group="hydra/launcher", name="ray", node=RayLauncherConf, provider="fedsim")
